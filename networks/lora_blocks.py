"""Block-wise LoRA (KS networks/lora.py): which UNet block a module belongs to, and the per-block rank, alpha and
learning-rate weight lists of `--network_args block_dims=... down_lr_weight=...`.

KS numbers the UNet blocks of a *full-size* model, whatever the model at hand has (docs/train_network_README-ja.md
"階層別学習率" / "階層別dim"; KS PR #355):

* SD1/SD2 (25 blocks): 0 = conv_in (never has a LoRA), 1-12 = down, 12 = mid, 13-24 = up. A module named
  ``lora_unet_{down|up}_blocks_i_{resnets|attentions}_j_...`` is in block 3·i + j (+1 for down, +13 for up);
  ``..._{down|up}samplers_...`` in block 3·i + 2 (+1 / +13); ``mid_block_...`` in block 12. The up-sampler of an up
  block shares its index with that block's third resnet, exactly as in KS.
* SDXL (23 blocks), on KS's SAI module names: 0 = time/label embedding, 1-9 = input_blocks 0-8, 10-12 =
  middle_block 0-2, 13-21 = output_blocks 0-8, 22 = out.

`down_lr_weight` / `up_lr_weight` take 12 (SDXL 9) numbers or a preset `cosine|sine|linear|reverse_linear|zeros`
with an optional `+offset`; `mid_lr_weight` 1 (SDXL 3) numbers. Short lists are filled with 1.0 and long ones cut
(KS warns; we refuse long lists, see `parse_lr_weights`). A weight <= `block_lr_zero_threshold` becomes 0, and a
block of weight 0 gets no LoRA module at all.

Only the SD1/SD2 and SDXL UNets have these layouts; KS's SD3 network has no block-wise options.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BlockLayout:
    """KS's block numbering of one family's UNet."""
    num_down_or_up: int        # entries of down_lr_weight / up_lr_weight
    num_mid: int               # entries of mid_lr_weight
    num_blocks: int            # entries of block_dims / block_alphas / conv_block_dims / conv_block_alphas
    has_outer_blocks: bool     # SDXL: the lr-weight list gets 1.0 for block 0 (embeddings) and the last (out)
    block_index: Callable[[str], int]   # KS lora_name -> block index (-1: not a UNet block module)


_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def sd_block_index(lora_name: str) -> int:
    """KS get_block_index(lora_name, is_sdxl=False), on diffusers-path names (lora_unet_down_blocks_1_...)."""
    match = _RE_UPDOWN.search(lora_name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else 12 + 1 + idx
    if "mid_block_" in lora_name:
        return 12
    return -1


def sdxl_block_index(lora_name: str) -> int:
    """KS get_block_index(lora_name, is_sdxl=True), on SAI names (lora_unet_input_blocks_4_1_...)."""
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    if name.startswith("out_"):
        return 22
    return -1


SD_UNET_LAYOUT = BlockLayout(12, 1, 25, False, sd_block_index)     # SD1 / SD2
SDXL_UNET_LAYOUT = BlockLayout(9, 3, 23, True, sdxl_block_index)


def block_layout(family: str) -> BlockLayout | None:
    """The family's KS block layout (its registry entry names it), or None (e.g. SD3: no UNet blocks)."""
    from library.families import get_family

    return get_family(family).lora_block_layout


# ---------------------------------------------------------------------------------------------------------
# Parsing (ValueError with a reason; the caller turns it into a UserError naming the key)
# ---------------------------------------------------------------------------------------------------------
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def parse_block_list(text: str, count: int, cast: type, what: str) -> list:
    """'2,4,4,...' -> exactly `count` numbers (KS asserts the length)."""
    try:
        values = [cast(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"must be {count} comma-separated {what}") from None
    if len(values) != count:
        raise ValueError(f"needs {count} comma-separated values for this model family, got {len(values)}")
    if any(v < 0 for v in values):
        raise ValueError("values must be >= 0")
    return values


def lr_weight_preset(text: str, count: int) -> list[float]:
    """KS get_list: 'cosine+.25' -> count weights; sine/cosine quarter-waves, linear ramps, zeros; + adds."""
    name, _, offset_text = text.partition("+")
    offset = float(offset_text) if offset_text else 0.0
    ramp = [i / (count - 1) for i in range(count)]
    curves = {
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * count,
    }
    if name not in curves:
        raise ValueError(f"'{name}' is neither a list of numbers nor a preset ({', '.join(LR_WEIGHT_PRESETS)})")
    return [w + offset for w in curves[name]]


def parse_lr_weights(text: str, count: int, allow_preset: bool) -> list[float]:
    """KS parse_block_lr_kwargs + get_block_lr_weight for one of down/mid/up: numbers (empty entries are 0) or a
    preset; a short list is filled with 1.0. A list longer than the family has is refused (KS cuts it with a
    warning, which hides a recipe written for the other family)."""
    text = str(text).strip()
    if allow_preset and text.split("+")[0] in LR_WEIGHT_PRESETS:
        return lr_weight_preset(text, count)
    try:
        values = [float(v) if v.strip() else 0.0 for v in text.split(",")]
    except ValueError:
        if allow_preset:
            lr_weight_preset(text, count)  # raises the preset message
        raise ValueError("must be comma-separated numbers") from None
    if len(values) > count:
        raise ValueError(f"has {len(values)} values but this model family has {count} blocks there")
    if any(v < 0 for v in values):
        raise ValueError("weights must be >= 0")
    return values + [1.0] * (count - len(values))


def block_lr_weights(layout: BlockLayout, down: list[float] | None, mid: list[float] | None,
                     up: list[float] | None, zero_threshold: float) -> list[float] | None:
    """The per-block lr weight list (layout.num_blocks long) from parsed down/mid/up weights (a part not given is
    all 1.0), or None when none is given (KS get_block_lr_weight). A weight <= zero_threshold becomes 0."""
    if down is None and mid is None and up is None:
        return None

    def part(weights, count):
        if weights is None:
            return [1.0] * count
        return [w if w > zero_threshold else 0.0 for w in weights]

    weights = part(down, layout.num_down_or_up) + part(mid, layout.num_mid) + part(up, layout.num_down_or_up)
    if layout.has_outer_blocks:
        weights = [1.0] + weights + [1.0]
    return weights

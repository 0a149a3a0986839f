"""`--network_args` of networks.lora, checked and typed before any model loads.

`validate_network_args(network_args, family, ...)` turns KS's key=value strings into a `LoraOptions`; every
mistake is a UserError naming the key and the fix. The trainer calls it from `validate()` (through
networks/network_args.py) and `create_network` calls it again on the same strings, so what was checked is what
is built. Keys and their meaning are KS's (networks/lora.py; lora_sd3.py for `train_block_indices`,
lora_anima.py for `exclude_patterns` / `include_patterns`); docs/networks.md lists them.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Callable

from library.errors import UserError
from library.families import get_family
from networks import lora_blocks
from networks.network_args import check_key


@dataclass
class LoraOptions:
    """Typed network_args of networks.lora (None = not given)."""
    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    block_dims: list[int] | None = None            # per KS block; 0 = no module in that block
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weight: list[float] | None = None     # per KS block lr multiplier
    block_lr_zero_threshold: float = 0.0
    exclude_patterns: list[re.Pattern] = field(default_factory=list)
    include_patterns: list[re.Pattern] = field(default_factory=list)
    train_block_indices: list[int] | None = None   # sd3: transformer blocks that get modules
    dora_wd: bool = False
    verbose: bool = False


# ---------------------------------------------------------------------------------------------------------
# value parsers: raise ValueError(reason)
# ---------------------------------------------------------------------------------------------------------
def _non_negative_int(value) -> int:
    number = float(value)
    if number < 0 or number != int(number):
        raise ValueError("must be an integer >= 0")
    return int(number)


def _probability(value) -> float:
    p = float(value)
    if not 0.0 <= p < 1.0:
        raise ValueError("must be a probability in [0, 1)")
    return p


def _positive_float(value) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a number > 0")
    return number


def _non_negative_float(value) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be a number >= 0")
    return number


def _bool(value) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError("must be True or False")


def _patterns(value) -> list[re.Pattern]:
    """KS (lora_anima.py): a Python literal, a string or a list of strings (ast.literal_eval); a bare
    unquoted pattern is taken as one pattern. Each is a regular expression, matched with fullmatch."""
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        parsed = str(value)
    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    if not all(isinstance(p, str) for p in items):
        raise ValueError("must be a regular expression or a list of them, e.g. \"['.*attn.*', '.*ff.*']\"")
    try:
        return [re.compile(p) for p in items]
    except re.error as e:
        raise ValueError(f"is not a valid regular expression ({e})") from None


def _block_selection(value) -> list[int]:
    """KS lora_sd3 parse_block_selection: 'all', 'none', or '0-3,7' (indices >= 0)."""
    text = str(value).strip()
    if text == "all":
        return list(range(10_000))
    if text in ("none", ""):
        return []
    selected: list[int] = []
    for part in text.split(","):
        start, _, end = part.partition("-")
        a, b = int(start), int(end) if end else int(start)
        if a < 0 or b < a:
            raise ValueError(f"'{part}' is not an index or a range a-b with 0 <= a <= b")
        selected.extend(range(a, b + 1))
    return sorted(set(selected))


_SIMPLE: dict[str, tuple[Callable, str]] = {
    "conv_dim": (_non_negative_int, "rank of the 3×3 convs (LoCon), e.g. conv_dim=4"),
    "conv_alpha": (_non_negative_float, "alpha of the 3×3 convs, e.g. conv_alpha=1"),
    "rank_dropout": (_probability, "rank_dropout=0.1"),
    "module_dropout": (_probability, "module_dropout=0.1"),
    "loraplus_lr_ratio": (_positive_float, "loraplus_lr_ratio=16"),
    "loraplus_unet_lr_ratio": (_positive_float, "loraplus_unet_lr_ratio=16"),
    "loraplus_text_encoder_lr_ratio": (_positive_float, "loraplus_text_encoder_lr_ratio=4"),
    "block_lr_zero_threshold": (_non_negative_float, "block_lr_zero_threshold=0.1"),
    "exclude_patterns": (_patterns, "exclude_patterns=\"['.*attn2.*']\""),
    "include_patterns": (_patterns, "include_patterns=\"['.*attn2.to_k']\""),
    "train_block_indices": (_block_selection, "train_block_indices=0-3,7"),
    "dora_wd": (_bool, "dora_wd=True"),
    "verbose": (_bool, "verbose=True"),
}
_BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
               "mid_lr_weight", "up_lr_weight")
KNOWN_KEYS = tuple(_SIMPLE) + _BLOCK_KEYS

# KS keys of other KS network modules that networks.lora does not build, with what to use instead.
_NOT_HERE = {
    "dropout": "the neuron dropout of networks.lora is --network_dropout (LyCORIS's key is 'dropout')",
    "algo": "LyCORIS algorithms need --network_module lycoris.kohya",
    "preset": "presets are LyCORIS's; use --network_module lycoris.kohya, or exclude_patterns here",
    "factor": "LoKr needs --network_module lycoris.kohya algo=lokr",
    "train_blocks": "train_blocks is KS's Flux option; for SD3 use train_block_indices",
}
for _key in ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim",
             "emb_dims", "split_qkv", "train_t5xxl"):
    _NOT_HERE[_key] = ("an option of KS's SD3 network: use --network_module networks.lora_sd3 (networks.lora "
                       "targets SD3's attention projections only)")


def _fail(key: str, raw, reason: str, example: str) -> UserError:
    return UserError(f"--network_args: {key}={raw!r} {reason}; e.g. {example}")


def check_rank_and_alpha(network_dim, network_alpha, network_dropout) -> tuple[int, float, float | None]:
    """--network_dim (None -> 4), --network_alpha (None -> 1.0), --network_dropout, as KS defaults them."""
    dim = 4 if network_dim is None else network_dim
    try:
        if float(dim) != int(float(dim)) or int(float(dim)) < 1:
            raise ValueError
        dim = int(float(dim))
    except (TypeError, ValueError):
        raise UserError(f"--network_dim: {network_dim!r} is not a positive integer rank; e.g. --network_dim 16 "
                        "(to leave out blocks use block_dims with 0 entries)") from None
    try:
        alpha = _non_negative_float(1.0 if network_alpha is None else network_alpha)
    except (TypeError, ValueError):
        raise UserError(f"--network_alpha: {network_alpha!r} must be a number >= 0 (scale = alpha / rank; 0 means "
                        "alpha = rank); e.g. --network_alpha 8") from None
    dropout = None
    if network_dropout is not None:
        try:
            dropout = _probability(network_dropout)
        except (TypeError, ValueError):
            raise UserError(f"--network_dropout: {network_dropout!r} must be a probability in [0, 1)") from None
    return dim, alpha, dropout


def validate_network_args(network_args: dict, family: str, network_dim=None, network_alpha=None,
                          network_dropout=None, **_ignored) -> LoraOptions:
    """KS network_args strings of networks.lora -> LoraOptions; any mistake is a UserError naming the key."""
    dim, alpha, dropout = check_rank_and_alpha(network_dim, network_alpha, network_dropout)
    options = LoraOptions(dim=dim, alpha=alpha, dropout=dropout)
    raw_block: dict[str, str] = {}
    for key, raw in network_args.items():
        check_key(key, KNOWN_KEYS, "networks.lora", _NOT_HERE)
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
            continue
        if key in _BLOCK_KEYS:
            raw_block[key] = raw
            continue
        parse, example = _SIMPLE[key]
        try:
            setattr(options, key, parse(raw))
        except (TypeError, ValueError) as e:
            raise _fail(key, raw, str(e) or "is not valid", example) from None
    if options.conv_dim is not None and options.conv_alpha is None:
        options.conv_alpha = 1.0  # KS default
    _block_options(options, raw_block, family, options.block_lr_zero_threshold)
    if options.train_block_indices is not None and lora_blocks.block_layout(family) is not None:
        raise UserError("--network_args: train_block_indices selects SD3 transformer blocks (KS lora_sd3); for "
                        f"{family} use block_dims with 0 for the blocks to leave out")
    if options.dora_wd:
        if get_family(family).lora_file_format == "peft":
            raise UserError("--network_args: dora_wd=True is for SD1/SD2/SDXL (kohya keys with .dora_scale); SD3 "
                            "files use diffusers/PEFT keys: use --network_module lycoris.kohya algo=lora dora_wd=True")
        if options.dropout is not None or options.rank_dropout is not None:
            raise UserError("--network_args: dora_wd=True works on the merged weight, so --network_dropout and "
                            "rank_dropout cannot apply; drop them (module_dropout works)")
    return options


def _block_options(options: LoraOptions, raw: dict[str, str], family: str, threshold: float) -> None:
    """KS create_network's block logic: block dims/alphas are used when block_dims or an lr weight is given."""
    if not raw:
        return
    layout = lora_blocks.block_layout(family)
    if layout is None:
        raise UserError(f"--network_args: {', '.join(raw)}: block-wise options are for the SD1/SD2/SDXL UNet; "
                        f"{family} has no KS block layout (SD3: train_block_indices)")
    n = layout.num_blocks

    def parse(key, fn):
        if key not in raw:
            return None
        try:
            return fn(raw[key])
        except ValueError as e:
            if key == "mid_lr_weight":
                example = "mid_lr_weight=" + ",".join(["1.0"] * layout.num_mid)
            elif key.endswith("lr_weight"):
                example = f"{key}=cosine+.25"
            else:
                example = f"{key}=" + ",".join(["4"] * n)
            raise _fail(key, raw[key], str(e), example) from None

    lr_parts = {}
    for key, count, allow_preset in (("down_lr_weight", layout.num_down_or_up, True),
                                     ("mid_lr_weight", layout.num_mid, False),
                                     ("up_lr_weight", layout.num_down_or_up, True)):
        lr_parts[key] = parse(key, lambda t, c=count, p=allow_preset: lora_blocks.parse_lr_weights(t, c, p))
    options.block_lr_weight = lora_blocks.block_lr_weights(layout, *lr_parts.values(), threshold)
    block_dims = parse("block_dims", lambda t: lora_blocks.parse_block_list(t, n, int, "integer ranks"))
    block_alphas = parse("block_alphas", lambda t: lora_blocks.parse_block_list(t, n, float, "alphas"))
    conv_block_dims = parse("conv_block_dims", lambda t: lora_blocks.parse_block_list(t, n, int, "integer ranks"))
    conv_block_alphas = parse("conv_block_alphas", lambda t: lora_blocks.parse_block_list(t, n, float, "alphas"))

    if block_dims is None and options.block_lr_weight is None:
        # KS ignores these without block_dims / an lr weight; a recipe that says them means something
        given = [k for k in ("block_alphas", "conv_block_dims", "conv_block_alphas") if k in raw]
        raise UserError(f"--network_args: {', '.join(given)} need block_dims (KS silently ignores them without it); "
                        f"add block_dims=" + ",".join([str(options.dim)] * n))
    if conv_block_alphas is not None and conv_block_dims is None:
        raise UserError("--network_args: conv_block_alphas needs conv_block_dims (KS ignores it otherwise)")
    # KS get_block_dims_and_alphas
    options.block_dims = block_dims or [options.dim] * n
    options.block_alphas = block_alphas or [options.alpha] * n
    if conv_block_dims is not None:
        options.conv_block_dims = conv_block_dims
        options.conv_block_alphas = conv_block_alphas or [options.conv_alpha or 1.0] * n
    elif options.conv_dim is not None:
        options.conv_block_dims = [options.conv_dim] * n
        options.conv_block_alphas = [options.conv_alpha] * n
    # KS remove_block_dims_and_alphas: a block whose lr weight is 0 gets no modules
    if options.block_lr_weight is not None:
        for i, weight in enumerate(options.block_lr_weight):
            if weight == 0:
                options.block_dims[i] = 0
                if options.conv_block_dims is not None:
                    options.conv_block_dims[i] = 0

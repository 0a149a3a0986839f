"""Which modules get a LoRA, and the names they carry in files, per model family.

Names (spec cli-and-formats.md "LoRA file", kohya sd-scripts networks/lora.py):
* SD1/SD2 UNet: ``lora_unet_<diffusers module path, '.' -> '_'>``.
* SDXL UNet: ``lora_unet_<SAI/SGM module path>`` (input_blocks / middle_block / output_blocks), as KS trains SDXL
  on its SAI-layout UNet. The diffusers-style name of the same module is accepted when reading.
* Text encoders: ``lora_te_`` (one encoder) or ``lora_te1_`` / ``lora_te2_`` (CLIP-L, CLIP-G), followed by the
  transformers path WITH the ``text_model.`` level (transformers 5 dropped it from CLIPTextModel; keys keep it).
* SD3 (files use diffusers/PEFT keys): ``transformer.<path>.lora_A.weight`` / ``lora_B``,
  ``text_encoder.text_model.<path>...``, ``text_encoder_2.text_model.<path>...``. Internally SD3 modules are named
  ``lora_unet_<path>`` / ``lora_te1_...`` like the other families.

Every target also records its PEFT name (``unet.<path>``, ``transformer.<path>``, ``text_encoder.<path>``), so
diffusers-trained PEFT files load into any family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from library.ldm_convert import RESNET_TO_LDM

# KS networks/lora.py target tables: a Linear / Conv2d anywhere inside a module of these classes gets a LoRA.
UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# SD3 MMDiT: the attention projections of the image stream (to_*) and the context stream (add_*, to_add_out).
SD3_ATTENTION_MODULES = ("attn", "attn2")  # attn2: SD3.5's extra image-only attention in some blocks
SD3_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out")

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODER1 = "lora_te1"
LORA_PREFIX_TEXT_ENCODER2 = "lora_te2"
# diffusers pipeline component names, used as PEFT key prefixes
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """One module to wrap and its names."""
    lora_name: str              # internal name == KS file name for sd1/sdxl (e.g. lora_unet_input_blocks_4_1_...)
    module: torch.nn.Module     # the nn.Linear / nn.Conv2d
    module_path: str            # path inside `component` (diffusers / transformers naming)
    component: str              # 'unet' | 'transformer' | 'text_encoder' | 'text_encoder_2'
    kind: str                   # 'linear' | 'conv1x1' | 'conv' (any other kernel: LoCon, conv_dim)
    peft_name: str              # '<component>.<path>' (text encoders with the text_model. level)
    aliases: tuple[str, ...] = ()  # other KS-style names of the module accepted when reading

    @property
    def is_text_encoder(self) -> bool:
        return self.component.startswith("text_encoder")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a torch.compile / DDP wrapper."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def detect_family(unet: torch.nn.Module) -> str:
    """The registered family whose denoiser this is (each family's `detects`, library/families)."""
    from library.families import detect_family as registry_detect

    return registry_detect(unwrap(unet)).name


def is_sd3_transformer(unet: torch.nn.Module) -> bool:
    return type(unet).__name__ == "SD3Transformer2DModel"


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """A UNet with SDXL's size / pooled-text conditioning (addition_embed_type 'text_time')."""
    config = getattr(unet, "config", None) or {}
    return config.get("addition_embed_type") == "text_time"


def text_encoder_list(text_encoder) -> list:
    """A module or a list of modules (None entries allowed) -> list."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return list(text_encoder)
    return [text_encoder]


def _kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"


def _linear_or_conv_in(root: torch.nn.Module, block_classes: tuple[str, ...]):
    """(path, module) of each Linear / Conv2d inside modules whose class name is in block_classes, in
    named_modules order (KS create_modules), each module once."""
    seen: set[int] = set()
    for name, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_name, child in block.named_modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and id(child) not in seen:
                seen.add(id(child))
                yield f"{name}.{child_name}" if name else child_name, child


# ---------------------------------------------------------------------------------------------------------
# SDXL: diffusers UNet path -> SAI (SGM) path
# ---------------------------------------------------------------------------------------------------------
_RESNET_TO_SAI = dict(RESNET_TO_LDM)  # conv1 -> in_layers.2, norm1 -> in_layers.0, ...


def _per_block(value, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def sdxl_sai_path(path: str, unet_config) -> str:
    """diffusers UNet2DConditionModel module path -> SAI/SGM path (the layout of KS's SDXL UNet).

    With L_b = layers_per_block of down block b (up block b has L'_b + 1 layers, L' = reversed L):
      down_blocks.b.{resnets,attentions}.l  -> input_blocks.(1 + Σ_{b'<b}(L_b'+1) + l).{0,1}
      down_blocks.b.downsamplers.0.conv     -> input_blocks.(1 + Σ_{b'<b}(L_b'+1) + L_b).0.op
      mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
      up_blocks.b.{resnets,attentions}.l    -> output_blocks.(Σ_{b'<b}(L'_b'+1) + l).{0,1}
      up_blocks.b.upsamplers.0.conv         -> output_blocks.(last layer of b).(2 if b has attention else 1).conv
    Resnet children (library/ldm_convert.RESNET_TO_LDM): conv1 -> in_layers.2, time_emb_proj -> emb_layers.1,
    conv2 -> out_layers.3, conv_shortcut -> skip_connection, norm1 / norm2 -> in_layers.0 / out_layers.0.
    Source: SGM openaimodel.UNetModel; diffusers lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers (the inverse).
    Real SDXL (L = 2): down_blocks.1.attentions.0 -> input_blocks.4.1, up_blocks.0.attentions.0 ->
    output_blocks.0.1."""
    n_down = len(unet_config["down_block_types"])
    down_layers = _per_block(unet_config["layers_per_block"], n_down)
    up_layers = [n + 1 for n in reversed(down_layers)]
    up_has_attention = ["CrossAttn" in t for t in unet_config["up_block_types"]]

    parts = path.split(".")

    def resnet_rest(rest: list[str]) -> list[str]:
        if rest and rest[0] in _RESNET_TO_SAI:
            return _RESNET_TO_SAI[rest[0]].split(".") + rest[1:]
        raise ValueError(f"no SAI name for resnet child in '{path}'")

    head = parts[0]
    if head == "down_blocks":
        b, inner, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = 1 + sum(n + 1 for n in down_layers[:b])
        if inner == "resnets":
            return ".".join(["input_blocks", str(start + i), "0"] + resnet_rest(rest))
        if inner == "attentions":
            return ".".join(["input_blocks", str(start + i), "1"] + rest)
        if inner == "downsamplers" and rest == ["conv"]:
            return f"input_blocks.{start + down_layers[b]}.0.op"
    elif head == "mid_block":
        inner, i, rest = parts[1], int(parts[2]), parts[3:]
        if inner == "resnets":
            return ".".join(["middle_block", "0" if i == 0 else "2"] + resnet_rest(rest))
        if inner == "attentions":
            return ".".join(["middle_block", "1"] + rest)
    elif head == "up_blocks":
        b, inner, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = sum(up_layers[:b])
        if inner == "resnets":
            return ".".join(["output_blocks", str(start + i), "0"] + resnet_rest(rest))
        if inner == "attentions":
            return ".".join(["output_blocks", str(start + i), "1"] + rest)
        if inner == "upsamplers" and rest == ["conv"]:
            slot = "2" if up_has_attention[b] else "1"
            return f"output_blocks.{start + up_layers[b] - 1}.{slot}.conv"
    raise ValueError(f"no SAI name for UNet module '{path}'")


# ---------------------------------------------------------------------------------------------------------
# Target collection
# ---------------------------------------------------------------------------------------------------------
def _flat(path: str) -> str:
    return path.replace(".", "_")


def unet_targets(family: str, unet: torch.nn.Module, include_conv: bool) -> list[LoraTarget]:
    """Targets in the denoiser, by the family's builder (its registry entry). include_conv adds KS's LoCon
    blocks (ResnetBlock2D, Down/Upsample2D) where the family has them."""
    from library.families import get_family

    return get_family(family).lora_unet_targets(unwrap(unet), include_conv)


def sd3_attention_targets(unet: torch.nn.Module, include_conv: bool) -> list[LoraTarget]:
    """SD3 MMDiT: the attention projections of every JointTransformerBlock (PEFT-style names)."""
    targets = []
    for block_path, block in unet.named_modules():
        if type(block).__name__ != "JointTransformerBlock":
            continue
        for attn_name in SD3_ATTENTION_MODULES:
            for proj in SD3_ATTENTION_PROJECTIONS:
                path = f"{block_path}.{attn_name}.{proj}"
                module = _get_submodule_or_none(unet, path)
                if isinstance(module, torch.nn.Linear):
                    targets.append(LoraTarget(f"{LORA_PREFIX_UNET}_{_flat(path)}", module, path, "transformer",
                                              "linear", f"transformer.{path}"))
    return targets


def ks_unet_targets(unet: torch.nn.Module, include_conv: bool, sai_names: bool = False) -> list[LoraTarget]:
    """KS UNet targets named by their diffusers path, or (sai_names) by their SAI/SGM path with the diffusers
    name accepted when reading (KS trains SDXL on its SAI-layout UNet)."""
    targets = []
    classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if include_conv else ())
    for path, module in _linear_or_conv_in(unet, classes):
        diffusers_name = f"{LORA_PREFIX_UNET}_{_flat(path)}"
        if sai_names:
            name = f"{LORA_PREFIX_UNET}_{_flat(sdxl_sai_path(path, unet.config))}"
            aliases = (diffusers_name,)
        else:
            name, aliases = diffusers_name, ()
        targets.append(LoraTarget(name, module, path, "unet", _kind(module), f"unet.{path}", aliases))
    return targets


def sai_unet_targets(unet: torch.nn.Module, include_conv: bool) -> list[LoraTarget]:
    return ks_unet_targets(unet, include_conv, sai_names=True)


def text_encoder_targets(family: str, text_encoders: list) -> list[LoraTarget]:
    """CLIP targets (CLIPAttention, CLIPMLP linears). SD3's T5 (third encoder) is not targeted: diffusers'
    SD3 loader reads only text_encoder / text_encoder_2."""
    clip_encoders = text_encoders[:2]
    if len(clip_encoders) == 1:
        prefixes = [LORA_PREFIX_TEXT_ENCODER]
    else:
        prefixes = [LORA_PREFIX_TEXT_ENCODER1, LORA_PREFIX_TEXT_ENCODER2]
    targets = []
    for te, prefix, component in zip(clip_encoders, prefixes, TEXT_ENCODER_COMPONENTS):
        if te is None:
            continue
        te = unwrap(te)
        for path, module in _linear_or_conv_in(te, TEXT_ENCODER_TARGET_REPLACE_MODULE):
            # transformers 5 CLIPTextModel has no `text_model.` level; the key names keep it (KS, diffusers).
            key_path = path if path.startswith("text_model.") else f"text_model.{path}"
            targets.append(LoraTarget(f"{prefix}_{_flat(key_path)}", module, path, component, _kind(module),
                                      f"{component}.{key_path}"))
    return targets


def _get_submodule_or_none(root: torch.nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None

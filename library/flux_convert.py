"""Flux.1 / Chroma transformer: the Black Forest Labs (BFL) single-file layout <-> diffusers, as one table.

BFL checkpoints (flux1-dev.safetensors, Chroma.safetensors, what KS trains on) fuse projections that diffusers keeps
separate: a double block's ``img_attn.qkv`` is diffusers' ``attn.to_q | to_k | to_v`` stacked along the output
rows, a single block's ``linear1`` is ``attn.to_q | to_k | to_v | proj_mlp``. One table (``linear_maps``) says
which diffusers modules make up each BFL Linear; it drives both the weight conversion (single-file loading, tiny
test files) and the LoRA key names of networks/lora_flux.py (KS names BFL modules: ``lora_unet_`` + the BFL path
with ``_``). Facts from diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` /
``convert_chroma_transformer_checkpoint_to_diffusers`` (single_file_utils.py), which hard-code the full model's
width 3072; here split sizes come from the weights, so tiny models convert too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BFL_PREFIX = "model.diffusion_model."   # ComfyUI-saved BFL files carry it; BFL's own files do not


@dataclass(frozen=True)
class ModuleMap:
    """One BFL Linear and the diffusers Linear(s) whose outputs, stacked in this order, make it up."""
    bfl: str                        # e.g. "double_blocks.0.img_attn.qkv"
    diffusers: tuple[str, ...]      # e.g. ("transformer_blocks.0.attn.to_q", "...to_k", "...to_v")
    group: str                      # "double" | "single" | "in" (embedders) | "final" | "approximator"
    swap_halves: bool = False       # final_layer.adaLN_modulation.1: BFL (shift, scale), diffusers (scale, shift)

    @property
    def lora_name(self) -> str:
        """KS networks/lora_flux.py name: lora_unet_<BFL path with '.' -> '_'>."""
        return "lora_unet_" + self.bfl.replace(".", "_")


def _double_block(i: int, chroma: bool) -> list[ModuleMap]:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    maps = [] if chroma else [ModuleMap(b + "img_mod.lin", (d + "norm1.linear",), "double")]
    maps += [
        ModuleMap(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "double"),
        ModuleMap(b + "img_attn.proj", (d + "attn.to_out.0",), "double"),
        ModuleMap(b + "img_mlp.0", (d + "ff.net.0.proj",), "double"),
        ModuleMap(b + "img_mlp.2", (d + "ff.net.2",), "double"),
    ]
    if not chroma:
        maps.append(ModuleMap(b + "txt_mod.lin", (d + "norm1_context.linear",), "double"))
    maps += [
        ModuleMap(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
                  "double"),
        ModuleMap(b + "txt_attn.proj", (d + "attn.to_add_out",), "double"),
        ModuleMap(b + "txt_mlp.0", (d + "ff_context.net.0.proj",), "double"),
        ModuleMap(b + "txt_mlp.2", (d + "ff_context.net.2",), "double"),
    ]
    return maps


def _single_block(i: int, chroma: bool) -> list[ModuleMap]:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    maps = [ModuleMap(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), "single"),
            ModuleMap(b + "linear2", (d + "proj_out",), "single")]
    if not chroma:
        maps.append(ModuleMap(b + "modulation.lin", (d + "norm.linear",), "single"))
    return maps


def linear_maps(chroma: bool, num_double: int, num_single: int, guidance: bool,
                num_approximator_layers: int = 0) -> list[ModuleMap]:
    """Every Linear of the transformer, BFL name -> diffusers names, in BFL order (embedders, blocks, final)."""
    maps = [ModuleMap("img_in", ("x_embedder",), "in"), ModuleMap("txt_in", ("context_embedder",), "in")]
    if chroma:
        a = "distilled_guidance_layer."
        maps += [ModuleMap(a + "in_proj", (a + "in_proj",), "approximator"),
                 ModuleMap(a + "out_proj", (a + "out_proj",), "approximator")]
        for i in range(num_approximator_layers):
            maps += [ModuleMap(f"{a}layers.{i}.in_layer", (f"{a}layers.{i}.linear_1",), "approximator"),
                     ModuleMap(f"{a}layers.{i}.out_layer", (f"{a}layers.{i}.linear_2",), "approximator")]
    else:
        embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
        if guidance:
            embedders.append(("guidance_in", "guidance_embedder"))
        for bfl, diffusers in embedders:
            maps += [ModuleMap(f"{bfl}.in_layer", (f"time_text_embed.{diffusers}.linear_1",), "in"),
                     ModuleMap(f"{bfl}.out_layer", (f"time_text_embed.{diffusers}.linear_2",), "in")]
    for i in range(num_double):
        maps += _double_block(i, chroma)
    for i in range(num_single):
        maps += _single_block(i, chroma)
    maps.append(ModuleMap("final_layer.linear", ("proj_out",), "final"))
    if not chroma:
        maps.append(ModuleMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), "final", swap_halves=True))
    return maps


def norm_maps(chroma: bool, num_double: int, num_single: int,
              num_approximator_layers: int = 0) -> list[tuple[str, str]]:
    """The non-Linear parameters: RMSNorm scales (BFL ``.scale`` -> diffusers ``.weight``)."""
    pairs = []
    for i in range(num_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        pairs += [(b + "img_attn.norm.query_norm.scale", d + "norm_q.weight"),
                  (b + "img_attn.norm.key_norm.scale", d + "norm_k.weight"),
                  (b + "txt_attn.norm.query_norm.scale", d + "norm_added_q.weight"),
                  (b + "txt_attn.norm.key_norm.scale", d + "norm_added_k.weight")]
    for i in range(num_single):
        b, d = f"single_blocks.{i}.norm.", f"single_transformer_blocks.{i}.attn."
        pairs += [(b + "query_norm.scale", d + "norm_q.weight"), (b + "key_norm.scale", d + "norm_k.weight")]
    if chroma:
        pairs += [(f"distilled_guidance_layer.norms.{i}.scale", f"distilled_guidance_layer.norms.{i}.weight")
                  for i in range(num_approximator_layers)]
    return pairs


def split_sizes(module_map: ModuleMap, rows: int, in_features: int) -> list[int]:
    """Output rows of each diffusers part: qkv = three equal thirds; linear1 = (d, d, d, mlp) with d the block
    width (= linear1's input features, BFL flux/modules/layers.py SingleStreamBlock)."""
    parts = len(module_map.diffusers)
    if parts == 1:
        return [rows]
    if parts == 3:
        return [rows // 3] * 3
    return [in_features] * 3 + [rows - 3 * in_features]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BFLLayout:
    chroma: bool
    guidance: bool          # Flux.1 dev (guidance_in); schnell has none
    num_double: int
    num_single: int
    num_approximator_layers: int = 0

    @property
    def variant(self) -> str:
        return "chroma" if self.chroma else ("dev" if self.guidance else "schnell")


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(BFL_PREFIX):] if k.startswith(BFL_PREFIX) else k): v for k, v in state_dict.items()}


def detect_layout(state_dict: dict[str, torch.Tensor]) -> BFLLayout | None:
    """The BFL layout of a (prefix-stripped) transformer state dict, or None if it is not one (KS
    flux_utils.analyze_checkpoint_state: schnell = no guidance_in; Chroma = distilled_guidance_layer)."""
    keys = list(state_dict)
    if not any(k.startswith("double_blocks.") for k in keys):
        return None
    return BFLLayout(chroma=any(k.startswith("distilled_guidance_layer.") for k in keys),
                     guidance=any(k.startswith("guidance_in.") for k in keys),
                     num_double=_count(keys, r"double_blocks\.(\d+)\."),
                     num_single=_count(keys, r"single_blocks\.(\d+)\."),
                     num_approximator_layers=_count(keys, r"distilled_guidance_layer\.layers\.(\d+)\."))


def layout_of_model(transformer: torch.nn.Module) -> BFLLayout:
    """The BFL layout a diffusers FluxTransformer2DModel / ChromaTransformer2DModel corresponds to."""
    config = transformer.config
    chroma = hasattr(transformer, "distilled_guidance_layer")
    return BFLLayout(chroma=chroma, guidance=bool(config.get("guidance_embeds", False)),
                     num_double=int(config.num_layers), num_single=int(config.num_single_layers),
                     num_approximator_layers=int(config.get("approximator_layers", 0)) if chroma else 0)


def maps_for(layout: BFLLayout) -> list[ModuleMap]:
    return linear_maps(layout.chroma, layout.num_double, layout.num_single, layout.guidance,
                       layout.num_approximator_layers)


# ----------------------------------------------------------------------------------------------
# Weight conversion
# ----------------------------------------------------------------------------------------------
def bfl_to_diffusers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers state dict, BFL keys left over). Raises KeyError naming a missing BFL key."""
    source = strip_prefix(state_dict)
    layout = detect_layout(source)
    if layout is None:
        raise KeyError("double_blocks.0.img_attn.qkv.weight")
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for m in maps_for(layout):
        weight, bias = source[m.bfl + ".weight"], source.get(m.bfl + ".bias")
        used.update({m.bfl + ".weight", m.bfl + ".bias"})
        if m.swap_halves:
            weight, bias = _swap_halves(weight), None if bias is None else _swap_halves(bias)
        sizes = split_sizes(m, weight.shape[0], weight.shape[1])
        for name, w in zip(m.diffusers, torch.split(weight, sizes, dim=0)):
            out[name + ".weight"] = w.contiguous()
        if bias is not None:
            for name, b in zip(m.diffusers, torch.split(bias, sizes, dim=0)):
                out[name + ".bias"] = b.contiguous()
    for bfl, diffusers in norm_maps(layout.chroma, layout.num_double, layout.num_single,
                                    layout.num_approximator_layers):
        out[diffusers] = source[bfl]
        used.add(bfl)
    return out, sorted(set(source) - used)


def diffusers_to_bfl(state_dict: dict[str, torch.Tensor], layout: BFLLayout) -> dict[str, torch.Tensor]:
    """The inverse of bfl_to_diffusers (tiny BFL test files; exporting)."""
    out: dict[str, torch.Tensor] = {}
    for m in maps_for(layout):
        for suffix in (".weight", ".bias"):
            parts = [state_dict.get(name + suffix) for name in m.diffusers]
            if any(p is None for p in parts):
                continue
            fused = torch.cat(parts, dim=0)
            out[m.bfl + suffix] = _swap_halves(fused) if m.swap_halves else fused
    for bfl, diffusers in norm_maps(layout.chroma, layout.num_double, layout.num_single,
                                    layout.num_approximator_layers):
        out[bfl] = state_dict[diffusers]
    return out

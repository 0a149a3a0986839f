"""diffusers -> SAI single-file key layout for SD3 (MMDiT, 16-channel VAE, CLIP-L, CLIP-G, optional T5-XXL).

The SAI layout is what `sd3_medium_incl_clips[_t5xxlfp16].safetensors` uses and what ComfyUI / kohya read:

    model.diffusion_model.*          MMDiT (joint_blocks.N.{x_block,context_block}.*, fused qkv)
    first_stage_model.*              VAE in the LDM layout (no quant_conv in SD3)
    text_encoders.clip_l.transformer.text_model.*      CLIP-L, transformers layout, no projection
    text_encoders.clip_g.transformer.{text_model.*,text_projection.weight}   CLIP-G
    text_encoders.t5xxl.transformer.*                   T5-XXL encoder (optional)

The transformer map is the exact inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`
(diffusers 0.42 loaders/single_file_utils.py); a test round-trips it through that function.
"""
from __future__ import annotations

import torch

from library.ldm_convert import vae_to_ldm

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

# Top-level modules: diffusers name -> SAI name (suffix .weight / .bias kept).
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Per joint block: diffusers module (under transformer_blocks.N.) -> SAI module (under joint_blocks.N.).
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# SAI fuses q, k, v into one qkv linear (rows stacked q; k; v).
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of an AdaLayerNormContinuous projection.

    SAI's final adaLN splits its output as (shift, scale), diffusers as (scale, shift); swapping the halves is its
    own inverse (diffusers single_file_utils.swap_scale_shift)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_to_sai(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel state dict -> SAI `model.diffusion_model.*` keys (inverse of diffusers' converter)."""
    out: dict[str, torch.Tensor] = {MMDIT_PREFIX + "pos_embed": sd["pos_embed.pos_embed"]}
    for name, value in sd.items():
        module, _, param = name.rpartition(".")
        if module in _TOP:
            # the final adaLN is stored (shift, scale) in SAI
            value = swap_scale_shift(value) if module == "norm_out.linear" else value
            out[MMDIT_PREFIX + _TOP[module] + "." + param] = value
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        last = i == num_layers - 1
        for d_module, s_module in _BLOCK.items():
            for param in ("weight", "bias"):
                key = block + d_module + "." + param
                if key not in sd:
                    continue
                value = sd[key]
                # the last block's context stream is pre-only: its adaLN is a continuous one, stored (shift, scale)
                if last and d_module == "norm1_context.linear":
                    value = swap_scale_shift(value)
                out[f"{MMDIT_PREFIX}joint_blocks.{i}.{s_module}.{param}"] = value
        for s_module, parts in _QKV.items():
            for param in ("weight", "bias"):
                keys = [block + p + "." + param for p in parts]
                if all(k in sd for k in keys):
                    out[f"{MMDIT_PREFIX}joint_blocks.{i}.{s_module}.{param}"] = torch.cat([sd[k] for k in keys], dim=0)
    return out


def clip_to_sai(sd: dict[str, torch.Tensor], prefix: str, keep_projection: bool) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> `text_encoders.clip_{l,g}.transformer.*`.

    transformers >= 5.6 may drop the `text_model.` level from CLIP module paths; the SAI layout keeps it.
    SD3 uses CLIP-L's pooled output unprojected, so SAI files carry no CLIP-L projection (keep_projection=False);
    diffusers' loader puts an identity there."""
    out = {}
    for key, value in sd.items():
        if key.startswith("text_projection."):
            if keep_projection:
                out[prefix + key] = value
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def t5_to_sai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5EncoderModel state dict -> `text_encoders.t5xxl.transformer.*`; the tied encoder.embed_tokens copy of
    `shared` is dropped, as safetensors files store a tied tensor once."""
    return {T5_PREFIX + k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


def sd3_pipeline_to_sai(pipe, include_t5: bool = True) -> dict[str, torch.Tensor]:
    """A StableDiffusion3Pipeline (or anything with its attributes) -> one SAI-layout state dict."""
    sd = mmdit_to_sai(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    sd.update(clip_to_sai(pipe.text_encoder.state_dict(), CLIP_L_PREFIX, keep_projection=False))
    sd.update(clip_to_sai(pipe.text_encoder_2.state_dict(), CLIP_G_PREFIX, keep_projection=True))
    if include_t5 and getattr(pipe, "text_encoder_3", None) is not None:
        sd.update(t5_to_sai(pipe.text_encoder_3.state_dict()))
    return {k: v.detach().contiguous() for k, v in sd.items()}

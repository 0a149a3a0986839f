"""diffusers SDXL -> SAI single-file layout (the layout of sd_xl_base_1.0.safetensors).

SAI / generative-models key prefixes:
    model.diffusion_model.*                 UNet (LDM names; see library/ldm_convert.unet_to_ldm)
    first_stage_model.*                     VAE (LDM names; library/ldm_convert.vae_to_ldm)
    conditioner.embedders.0.transformer.*   CLIP-L, transformers names under `text_model.`
    conditioner.embedders.1.model.*         OpenCLIP-G, open_clip names

The OpenCLIP-G part is the inverse of diffusers' `single_file_utils.convert_open_clip_checkpoint`:
q/k/v projections are packed row-wise into `attn.in_proj_weight` / `in_proj_bias` ([3·width, width]) as
torch.nn.MultiheadAttention stores them, and `text_projection` is stored as a [width, proj] matrix used as
`x @ text_projection` (the transpose of the transformers Linear weight).

Used by the test fixtures and tools to make single-file checkpoints; the trainer itself only reads them.
"""
from __future__ import annotations

import torch

from library.ldm_convert import clip_to_ldm, clip_to_openclip_ldm, unet_to_ldm, vae_to_ldm

SAI_UNET_PREFIX = "model.diffusion_model."
SAI_VAE_PREFIX = "first_stage_model."
SAI_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SAI_OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."


def open_clip_g_to_sai(state_dict: dict[str, torch.Tensor],
                       prefix: str = SAI_OPEN_CLIP_G_PREFIX) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> open_clip keys under `prefix`, with its real text projection.

    The layer layout is SD2's OpenCLIP layout (library/ldm_convert.clip_to_openclip_ldm); SDXL keeps every
    layer (no unused final block) and uses the pooled projection, stored transposed: [width, proj]."""
    flat = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = clip_to_openclip_ldm(flat, prefix=prefix, unused_final_layers=0)
    out[prefix + "text_projection"] = flat["text_projection.weight"].T.contiguous()
    return out


def sdxl_to_sai(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All four SDXL modules -> one SAI-layout state dict (contiguous tensors, ready for safetensors)."""
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update(clip_to_ldm(text_encoder.state_dict(), prefix=SAI_CLIP_L_PREFIX))
    sd.update(open_clip_g_to_sai(text_encoder_2.state_dict()))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def sdxl_pipeline_to_sai(pipe) -> dict[str, torch.Tensor]:
    """A StableDiffusionXLPipeline -> SAI-layout state dict."""
    return sdxl_to_sai(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)

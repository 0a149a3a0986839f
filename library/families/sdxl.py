"""The SDXL family adapter: UNet with size conditioning, CLIP-L + OpenCLIP-G text encoders, DDPM schedule.

Semantics follow kohya sd-scripts (KS) `library/sdxl_train_util.py` / `train_util.get_hidden_states_sdxl` and
Stability's generative-models (SAI) `sgm/modules/encoders/modules.py`:
* text conditioning = cat(CLIP-L hidden_states[-2], OpenCLIP-G hidden_states[-2]) on the feature axis (the
  penultimate layer, before any final layer norm), plus OpenCLIP-G's pooled `text_embeds` (the final-layer-normed
  EOS token through the text projection);
* micro-conditioning (Podell et al. 2023, SDXL §2.2): time_ids = (original h, w, crop top, left, target h, w)
  per sample, embedded by the UNet (diffusers `added_cond_kwargs`).
"""
from __future__ import annotations

import argparse
import logging
import os
from types import SimpleNamespace
from typing import Any

import torch

from library.errors import UserError
from library.families import detect
from library.families.base import Family, ModelOptions, Models
from library.families.loading import (
    alphas_cumprod_from_scheduler_config,
    config_dir_for,
    load_clip_tokenizer,
    load_component,
    load_single_file_state_dict,
    load_vae,
    model_from_config,
    read_scheduler_config,
    resolve_model_source,
    vae_from_single_file_state_dict,
)
from library.families.sd1 import CLIP_CHUNK, MAX_TOKEN_LENGTHS, chunk_token_ids, merge_chunk_states
from library.sdxl_convert import SAI_CLIP_L_PREFIX, SAI_OPEN_CLIP_G_PREFIX, SAI_UNET_PREFIX
from networks import lora_blocks, lora_keys

logger = logging.getLogger(__name__)

FAMILY_KEY = "sdxl"                   # configs/models/sdxl
# Shipped SDXL tokenizer folders hold only tokenizer_config.json; the CLIP BPE files (identical for CLIP-L and
# OpenCLIP-G) are shipped once, with SD1.5 (loading.load_clip_tokenizer).
# per-sample batch entries of the size conditioning, in time_ids order ([B, 2] LongTensors, pixels)
SIZE_KEYS = ("original_sizes", "crop_top_lefts", "target_sizes")


# ----------------------------------------------------------------------------------------------
# Pure functions: size conditioning (chunked CLIP tokens / states: library/families/sd1.py, shared with SD1/SD2)
# ----------------------------------------------------------------------------------------------
def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor,
                  target_sizes: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning, [B, 6] float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Podell et al. 2023 (SDXL) §2.2; the order of diffusers `StableDiffusionXLPipeline._get_add_time_ids` and KS
    `sdxl_train_util.get_size_embeddings`. Each input is [B, 2] (h, w) / (top, left) in pixels."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).to(torch.float32)


def default_size_conditioning(latents: torch.Tensor, vae_scale_factor: int) -> dict[str, torch.Tensor]:
    """No size info in the batch: original = target = the latent size in pixels, no crop (KS's fallback)."""
    batch = latents.shape[0]
    size = torch.tensor([latents.shape[-2] * vae_scale_factor, latents.shape[-1] * vae_scale_factor],
                        device=latents.device).expand(batch, 2)
    return {"original_sizes": size, "crop_top_lefts": torch.zeros_like(size), "target_sizes": size}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def check_options(opts: ModelOptions) -> None:
    """SDXL-specific flag checks. KS `sdxl_train_util.verify_sdxl_training_args` rejects --v2 and ignores
    --clip_skip with a warning: here sdxl_train_network.py does not offer them (SDXL's options have no such
    fields), so the parser rejects them."""
    if opts.max_token_length is not None and opts.max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length: {opts.max_token_length} is not supported; use one of "
                        f"{', '.join(map(str, MAX_TOKEN_LENGTHS))} (or omit it for 75)")


def scheduler_config_for_training(base: dict, opts: ModelOptions) -> dict:
    """The scheduler config with the run's prediction type (and zero terminal SNR for sampling)."""
    config = dict(base)
    config["prediction_type"] = "v_prediction" if opts.v_parameterization else "epsilon"
    if opts.zero_terminal_snr:
        # Lin et al. 2024 §3.1/§3.3: rescaled betas, and sample from the last timestep ("trailing").
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def _components_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str, dtype: torch.dtype,
                                flag: str) -> dict[str, torch.nn.Module]:
    """SAI single-file tensors -> diffusers / transformers modules, with diffusers' own key converters."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    for prefix, what in ((SAI_UNET_PREFIX, "UNet"), (SAI_CLIP_L_PREFIX, "CLIP-L text encoder"),
                         (SAI_OPEN_CLIP_G_PREFIX, "OpenCLIP-G text encoder")):
        if not any(k.startswith(prefix) for k in state_dict):
            raise UserError(f"{flag}: the checkpoint has no {what} ('{prefix}*' keys); it is not an SDXL base "
                            "checkpoint in the SAI layout (use the matching trainer for SD1/SD2/SD3 files)")

    g_config = CLIPTextConfig.from_pretrained(os.path.join(config_dir, "text_encoder_2"), local_files_only=True)
    try:
        unet_config = UNet2DConditionModel.load_config(os.path.join(config_dir, "unet"), local_files_only=True)
        unet_weights = convert_ldm_unet_checkpoint(state_dict, unet_config)
        # CLIP-L: transformers names under `text_model.`; transformers 5's CLIPTextModel has no such level.
        clip_l = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state_dict).items()}
        # OpenCLIP-G: converted directly, not through create_diffusers_clip_model_from_ldm, which tells the two
        # encoders apart by their width and so misreads checkpoints whose encoders share one (the tiny test model).
        # The converter reads only `.config.hidden_size`, and only when the file lacks text_projection.
        open_clip_g = convert_open_clip_checkpoint(SimpleNamespace(config=g_config), state_dict,
                                                   prefix=SAI_OPEN_CLIP_G_PREFIX)
    except (KeyError, IndexError, ValueError) as err:
        # diffusers' converters index the keys the config promises; a mismatch surfaces as a KeyError inside.
        raise UserError(f"{flag}: the checkpoint does not match the SDXL architecture in '{config_dir}' "
                        f"({type(err).__name__}: {err}); pass --model_config DIR with the matching configs") from err
    unet = model_from_config(UNet2DConditionModel, config_dir, "unet", unet_weights, dtype, flag)
    text_encoder = model_from_config(CLIPTextModel, config_dir, "text_encoder", clip_l, dtype, flag)
    text_encoder_2 = model_from_config(CLIPTextModelWithProjection, config_dir, "text_encoder_2", open_clip_g,
                                       dtype, flag)
    vae = vae_from_single_file_state_dict(state_dict, config_dir, dtype, flag)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


def _components_from_diffusers(root: str, dtype: torch.dtype, allow_pickle: bool, flag: str,
                               with_vae: bool = True) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    if with_vae:
        classes["vae"] = AutoencoderKL
    missing = [name for name in classes if not os.path.isdir(os.path.join(root, name))]
    if missing:
        raise UserError(f"{flag}: '{root}' lacks {', '.join(f'{m}/' for m in missing)}; it is not an SDXL diffusers "
                        "folder (SDXL has unet/, vae/, text_encoder/ and text_encoder_2/)")
    return {name: load_component(cls, root, name, dtype, allow_pickle, flag) for name, cls in classes.items()}


class SDXLAdapter:
    """SDXL base (and v-prediction finetunes with --v_parameterization)."""

    name = "sdxl"
    kind = "ddpm"
    bucket_reso_steps = 64   # KS default for every script (KS only checks SDXL steps divide by 32)

    def prediction_type(self, opts: ModelOptions) -> str:
        return "v_prediction" if opts.v_parameterization else "epsilon"

    def load(self, opts: ModelOptions) -> Models:
        """A diffusers folder (its own configs), or an SAI single-file .safetensors read with the configs in
        configs/models/sdxl or --model_config DIR. --vae replaces the VAE. Offline only."""
        flag = "--pretrained_model_name_or_path"
        check_options(opts)
        kind, path = resolve_model_source(opts.pretrained_model_name_or_path, opts.allow_pickle, flag)
        dtype = opts.weight_dtype
        if kind == "diffusers":
            if opts.model_config:
                raise UserError(f"--model_config: only used for single-file checkpoints; '{path}' is a diffusers "
                                "folder with its own configs; drop --model_config")
            config_dir = path
            modules = _components_from_diffusers(path, dtype, opts.allow_pickle, flag, with_vae=not opts.vae)
        else:
            config_dir = config_dir_for(FAMILY_KEY, opts.model_config)
            state_dict = load_single_file_state_dict(path, opts.allow_pickle, flag, lazy=True)
            modules = _components_from_state_dict(state_dict, config_dir, dtype, flag)
            del state_dict
        tokenizer_flag = flag if kind == "diffusers" else "--model_config"
        tokenizers = [load_clip_tokenizer(config_dir, name, pad, tokenizer_flag)
                      for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
        if opts.vae:
            # a single-file VAE takes the architecture of the VAE it replaces (config_dir/vae/config.json)
            modules["vae"] = load_vae(opts.vae, config_dir, opts.allow_pickle, dtype)
        folder_scheduler = read_scheduler_config(config_dir, flag)
        scheduler_config = scheduler_config_for_training(folder_scheduler, opts)
        if kind == "diffusers" and folder_scheduler.get("prediction_type", "epsilon") != \
                scheduler_config["prediction_type"]:
            # KS decides by the flag alone; say so, because a v model trained as ε (or back) degrades.
            logger.warning("the model's scheduler says prediction_type=%s but training uses %s (--v_parameterization "
                           "%s)", folder_scheduler.get("prediction_type"), scheduler_config["prediction_type"],
                           "given" if opts.v_parameterization else "not given")
        for module in modules.values():
            module.requires_grad_(False)  # base weights stay frozen; networks/lora adds the trainable parameters
        return Models(
            denoiser=modules["unet"],
            vae=modules["vae"],
            text_encoders=[modules["text_encoder"], modules["text_encoder_2"]],
            tokenizers=tokenizers,
            alphas_cumprod=alphas_cumprod_from_scheduler_config(scheduler_config),
            scheduler_config=scheduler_config,
            extra={"max_token_length": opts.max_token_length},
        )

    # ------------------------------------------------------------------------------------------
    def encode_images(self, models: Models, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z = vae.encode(x).latent_dist.sample() · scaling_factor (0.13025 for SDXL; KS: a sample, not the mode).

        The SDXL 1.0 VAE overflows in fp16 (its config says force_upcast): the loop keeps it in fp32 under fp16
        (memory_modes.vae_dtype); bf16 has the range."""
        vae = models.vae
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * vae.config.scaling_factor

    def tokenize(self, models: Models, captions: list[str]) -> list[torch.Tensor]:
        """[B, 77] ids per tokenizer, or with --max_token_length N (75/150/225) [B, 77·N/75]: N/75 windows of
        <BOS> 75 <EOS|PAD> side by side (KS get_input_ids; tokenizer_2 pads with '!', so KS's repairs apply)."""
        max_token_length = models.extra.get("max_token_length")
        length = CLIP_CHUNK if max_token_length is None else max_token_length + 2
        token_ids = []
        for tokenizer in models.tokenizers:
            ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length,
                            return_tensors="pt").input_ids
            if max_token_length is not None:
                ids = chunk_token_ids(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
            token_ids.append(ids)
        return token_ids

    def encode_text(self, models: Models, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [B, L, D_l + D_g], "text_embeds": [B, P_g]} (both sliceable per sample).

        L = 77, or N + 2 with --max_token_length N. Each encoder runs on [B·n, 77] windows; hidden states are
        layer −2 (penultimate, no final norm) of each; the pooled embedding is OpenCLIP-G's `text_embeds` of the
        first window (KS `get_hidden_states_sdxl`: `pool2[::n_size]`)."""
        clip_l, open_clip_g = models.text_encoders
        ids_l, ids_g = tokens
        batch, length = ids_l.shape
        n_chunks = length // CLIP_CHUNK
        out_l = clip_l(_windows(ids_l, clip_l), output_hidden_states=True)
        out_g = open_clip_g(_windows(ids_g, open_clip_g), output_hidden_states=True)
        hidden_l = merge_chunk_states(out_l.hidden_states[-2].reshape(batch, length, -1), n_chunks)
        hidden_g = merge_chunk_states(out_g.hidden_states[-2].reshape(batch, length, -1), n_chunks)
        pooled = out_g.text_embeds.reshape(batch, n_chunks, -1)[:, 0]
        return {"encoder_hidden_states": torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1),
                "text_embeds": pooled}

    def predict(self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """UNet output for the batch, with time_ids from batch["original_sizes"], ["crop_top_lefts"],
        ["target_sizes"] ([B, 2] each; an absent one -> latent size · 8, or no crop)."""
        unet = models.denoiser
        dtype = unet.dtype
        sizes = default_size_conditioning(noisy_latents, _vae_scale_factor(models.vae))
        sizes.update({key: batch[key].to(noisy_latents.device) for key in SIZE_KEYS if key in batch})
        time_ids = sdxl_time_ids(*(sizes[key] for key in SIZE_KEYS))
        added = {"text_embeds": conditioning["text_embeds"].to(noisy_latents.device, dtype),
                 "time_ids": time_ids.to(noisy_latents.device, dtype)}
        hidden = conditioning["encoder_hidden_states"].to(noisy_latents.device, dtype)
        return unet(noisy_latents.to(dtype), timesteps, hidden, added_cond_kwargs=added).sample

    def pipeline(self, models: Models) -> Any:
        """StableDiffusionXLPipeline over the same modules (no watermarker), Euler scheduler from the run's
        scheduler config."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.denoiser,
            scheduler=EulerDiscreteScheduler.from_config(models.scheduler_config), add_watermarker=False)

    def pipeline_kwargs(self, models: Models) -> dict[str, Any]:
        return {}


def _windows(ids: torch.Tensor, encoder: torch.nn.Module) -> torch.Tensor:
    """[B, n·77] -> [B·n, 77] on the encoder's device."""
    return ids.reshape(-1, CLIP_CHUNK).to(encoder.device)


def _vae_scale_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


ADAPTER = SDXLAdapter()


def write_tiny_model(out: str, seed: int = 0) -> dict:
    from library import tiny_models

    return tiny_models.save_tiny_pipeline(tiny_models.build_sdxl(seed), out)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """SDXL's own model flags: KS sdxl_train_network.py's --disable_mmap_load_safetensors, a no-op here
    (library/ks_compat.py)."""
    group.add_argument("--disable_mmap_load_safetensors", action="store_true")


# ----------------------------------------------------------------------------------------------
# Recognising this family's checkpoints before loading (library/families/detect.py asks)
# ----------------------------------------------------------------------------------------------
def recognise_checkpoint(ckpt: detect.Checkpoint) -> detect.Detected | None:
    """This family's diffusers folders and single files, from configs or tensor names (nothing loads)."""
    if ckpt.kind == "diffusers":
        if ckpt.pipeline_class.startswith("StableDiffusionXL") or \
                ckpt.config("unet").get("addition_embed_type") == "text_time":
            return detect.Detected(SDXLAdapter.name, "SDXL", v_prediction=detect.folder_prediction(ckpt))
        return None
    return detect.Detected(SDXLAdapter.name, "SDXL") if ckpt.has_prefix("conditioner.embedders.") else None


FAMILY = Family(
    adapter_class=SDXLAdapter, entry_script="sdxl_train_network.py", prediction_types=("epsilon", "v_prediction"),
    add_arguments=add_arguments, check=check_options, text_encoder_cache=True, batch_keys=SIZE_KEYS,
    lora_unet_targets=lora_keys.sai_unet_targets, lora_file_format="kohya", detects=lora_keys.is_sdxl_unet,
    lora_block_layout=lora_blocks.SDXL_UNET_LAYOUT, recognise=recognise_checkpoint,
    base_model_version=lambda args: "sdxl_base_v1-0",
    modelspec_architecture=lambda args: "stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",   # KS: LoRA + SDXL
    write_tiny_model=write_tiny_model, default_resolution=1024, latent_channels=4)

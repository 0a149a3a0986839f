"""The Flux.1 (dev / schnell) and Chroma family adapters: rectified flow on packed 2×2 latent patches.

Facts from KS flux_train_network.py, library/flux_train_utils.py, flux_utils.py, strategy_flux.py and
chroma_models.py, and diffusers' FluxPipeline / ChromaPipeline (what loads and samples the result):
* Latents: z = (E(x) − 0.1159)·0.3611 (16 channels), packed to tokens [B, (h/2)(w/2), 64] in (c, ph, pw) order;
  image ids (0, row, col) per token, text ids all zero (flux_utils.pack_latents / prepare_img_ids = diffusers
  _pack_latents / _prepare_latent_image_ids).
* Timestep input: σ ∈ (0, 1] (the transformer multiplies by 1000 inside); target ε − x0 (flow velocity).
* Flux: CLIP-L pooled output (pooler_output) + T5-XXL hidden states; dev embeds --guidance_scale (KS default 3.5;
  1.0 is what KS recommends for training), schnell has no guidance embedding. --apply_t5_attn_mask: T5 ignores
  padding and the transformer's attention masks padded text keys (KS flux_models.DoubleStreamBlock).
* Chroma: T5 only, always masked, attending one padding token after the caption (KS chroma_models attn_padding=1,
  diffusers ChromaPipeline); no guidance embedding (KS requires --guidance_scale 0).
* --model_prediction_type (KS): raw = the output is the velocity; additive = output + x_σ compared with ε − x0 (KS
  literally); sigma_scaled = x̂0 = x_σ − σ·F compared with x0 (prediction type "flow_x0", as SD3's
  --precondition_outputs; KS compares x̂0 with ε − x0, which has no consistent optimum: docs/flux.md).
See docs/flux.md.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from library import flux_convert
from library.errors import UserError
from library.families import loading
from library.families.base import Family, ModelOptions, Models

SOURCE_FLAG = "--pretrained_model_name_or_path"
MODEL_TYPES = ("flux", "chroma")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
# Offline-only fallbacks for the T5 tokenizer (a sentencepiece model, not shipped): the local HF cache.
CACHED_T5_TOKENIZERS = (("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
                        ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"), ("lodestones/Chroma1-HD", "tokenizer"),
                        ("google/t5-v1_1-xxl", ""))
# KS sai_model_spec: modelspec.architecture (ARCH_FLUX_1_DEV / _SCHNELL / ARCH_FLUX_1_CHROMA; "flux-1" when the
# variant is unknown) and modelspec.implementation (IMPL_FLUX, IMPL_CHROMA) by the variant read from the model
MODELSPEC_ARCHITECTURES = {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "chroma": "chroma"}
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_CHROMA = "https://huggingface.co/lodestones/Chroma"
CHROMA_EXTRA_PADDING = 1   # Chroma attends this many padding tokens after the caption (KS attn_padding)


@dataclass
class FluxOptions(ModelOptions):
    """The Flux / Chroma model flags (KS flux_train_utils.add_flux_train_arguments and flux_train_network.py)."""
    model_type: str = "flux"
    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    t5xxl_max_token_length: int | None = None    # None: 256 for schnell, 512 for dev and Chroma (KS)
    apply_t5_attn_mask: bool = False
    guidance_scale: float = 3.5
    model_prediction_type: str = "sigma_scaled"
    blocks_to_swap: int | None = None
    split_mode: bool = False
    controlnet_model_name_or_path: str | None = None
    disable_mmap_load_safetensors: bool = False
    tokenizer_cache_dir: str | None = None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The Flux / Chroma model flags, KS names and defaults."""
    group.add_argument("--model_type", type=str, default="flux", choices=MODEL_TYPES,
                       help="flux (Flux.1 dev / schnell) or chroma (default flux)")
    group.add_argument("--clip_l", type=str, default=None, help="CLIP-L weights (.safetensors); not used by Chroma")
    group.add_argument("--t5xxl", type=str, default=None, help="T5-XXL weights (.safetensors)")
    group.add_argument("--ae", type=str, default=None, help="the Flux autoencoder (ae.safetensors)")
    group.add_argument("--t5xxl_max_token_length", type=int, default=None,
                       help="T5 tokens (default 256 for schnell, 512 for dev and Chroma)")
    group.add_argument("--apply_t5_attn_mask", action="store_true",
                       help="mask T5 padding in the text encoder and in the transformer's attention (Chroma: always)")
    group.add_argument("--guidance_scale", type=float, default=3.5,
                       help="Flux.1 dev embedded guidance while training (KS default 3.5; 1.0 is usual; Chroma 0)")
    group.add_argument("--model_prediction_type", type=str, default="sigma_scaled", choices=PREDICTION_TYPES,
                       help="raw (recommended), additive, sigma_scaled (KS default); see docs/flux.md")
    group.add_argument("--blocks_to_swap", type=int, default=None,
                       help="KS: swap this many transformer blocks between CPU and GPU (see docs/flux.md)")
    group.add_argument("--split_mode", action="store_true", help="KS: deprecated; refused (use --blocks_to_swap)")
    group.add_argument("--controlnet_model_name_or_path", type=str, default=None, help="KS: refused")
    group.add_argument("--disable_mmap_load_safetensors", action="store_true",
                       help="accepted for KS compatibility (no effect here)")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="a folder holding the T5 tokenizer (tokenizer.json or spiece.model), used offline")


def check(opts: FluxOptions) -> None:
    """The Flux / Chroma flag rules, before anything loads."""
    chroma = opts.model_type == "chroma"
    rejected = {
        "--v2": (getattr(opts, "v2", False), "Flux is its own family; drop --v2"),
        "--v_parameterization": (opts.v_parameterization, "Flux is a flow model (target ε − x0); drop it"),
        "--zero_terminal_snr": (opts.zero_terminal_snr, "it rescales a DDPM schedule; Flux uses flow σ"),
        "--clip_skip": (getattr(opts, "clip_skip", None) is not None, "Flux uses CLIP-L's pooled output; drop it"),
        "--max_token_length": (opts.max_token_length is not None, "use --t5xxl_max_token_length for T5"),
        "--split_mode": (opts.split_mode, "deprecated in KS; use --blocks_to_swap (it trains the same network)"),
        "--controlnet_model_name_or_path": (opts.controlnet_model_name_or_path is not None,
                                            "training a LoRA with a ControlNet is not built here; drop it"),
        "--clip_l": (chroma and opts.clip_l is not None, "Chroma has no CLIP-L; drop --clip_l"),
    }
    for flag, (given, why) in rejected.items():
        if given:
            raise UserError(f"{flag}: not supported for {'Chroma' if chroma else 'Flux'}: {why}")
    if opts.t5xxl_max_token_length is not None and not 1 <= opts.t5xxl_max_token_length <= 512:
        raise UserError(f"--t5xxl_max_token_length: {opts.t5xxl_max_token_length} is outside [1, 512]; 512 (dev, "
                        "Chroma) or 256 (schnell) are the defaults")
    if opts.blocks_to_swap is not None and opts.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap: {opts.blocks_to_swap} is negative; give the number of blocks (e.g. 18)")
    if chroma and opts.guidance_scale != 0.0 and opts.guidance_scale != 3.5:
        raise UserError(f"--guidance_scale {opts.guidance_scale}: Chroma has no guidance embedding (KS requires "
                        "--guidance_scale 0.0); give 0.0 or drop it")
    if not chroma and opts.guidance_scale < 0:
        raise UserError(f"--guidance_scale: {opts.guidance_scale} is negative; 1.0 is usual for training dev")
    for flag, path in (("--clip_l", opts.clip_l), ("--t5xxl", opts.t5xxl), ("--ae", opts.ae)):
        if path is not None and not os.path.exists(os.path.expanduser(path)):
            raise UserError(f"{flag}: '{path}' does not exist")
    if opts.ae and opts.vae:
        raise UserError("--ae and --vae: both name the autoencoder; keep one (--ae is the KS Flux flag)")
    check_model_type_of_checkpoint(opts)


def notes(opts: FluxOptions) -> list[str]:
    """Flags accepted with no effect (or a changed one), said once when training starts."""
    out = []
    if opts.blocks_to_swap:
        out.append(f"--blocks_to_swap {opts.blocks_to_swap}: accepted; this build keeps every block on the "
                   "training device (no swapping), so it changes neither the result nor, on CPU, the memory")
    if opts.disable_mmap_load_safetensors:
        out.append("--disable_mmap_load_safetensors: no effect here (weights are read once, then converted)")
    if opts.model_type == "chroma" and not opts.apply_t5_attn_mask:
        out.append("Chroma always masks T5 padding (KS requires --apply_t5_attn_mask; ChromaPipeline masks too)")
    return out


def prediction_type_for(model_prediction_type: str) -> str:
    """The engine's prediction type: 'flow_x0' for sigma_scaled (x̂0 = x_σ − σ·F vs x0), else 'flow'."""
    return "flow_x0" if model_prediction_type == "sigma_scaled" else "flow"


# ----------------------------------------------------------------------------------------------
# Packing (pure functions)
# ----------------------------------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], each token one 2×2 patch in (c, ph, pw) order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for latents of height × width."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary ids of the packed tokens: (0, row, col)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def chroma_text_mask(tokenizer_mask: torch.Tensor, extra: int = CHROMA_EXTRA_PADDING) -> torch.Tensor:
    """Chroma attends its caption and `extra` padding tokens after it: position i is kept while i < n + extra,
    n the caption's token count including </s> (KS chroma_models txt_seq_len + attn_padding)."""
    lengths = tokenizer_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None, :]
    return (positions < lengths + extra).to(tokenizer_mask.dtype)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _t5_tokenizer(folders: list[tuple[str, str]], cache_dir: str | None) -> Any:
    """The T5 tokenizer from the first folder that has one (the model's own, --tokenizer_cache_dir), else the
    local Hugging Face cache; never downloaded."""
    from transformers import T5TokenizerFast

    candidates = list(folders) + ([(cache_dir, "")] if cache_dir else [])
    for root, subfolder in candidates:
        folder = os.path.join(os.path.expanduser(root), subfolder)
        if any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "spiece.model")):
            return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    for repo, subfolder in CACHED_T5_TOKENIZERS:
        try:
            return T5TokenizerFast.from_pretrained(repo, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise UserError("--tokenizer_cache_dir: no T5 tokenizer available offline (none in the model folder, none in "
                    "the local Hugging Face cache); pass --tokenizer_cache_dir DIR holding tokenizer.json or "
                    "spiece.model (e.g. FLUX.1-dev/tokenizer_2), or --model_config with a diffusers Flux folder")


def _t5_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str, subfolder: str,
                        opts: FluxOptions) -> Any:
    """T5EncoderModel from a T5 file (a full T5 file's decoder is dropped)."""
    encoder_only = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
    return loading.t5_from_state_dict(encoder_only, config_dir, subfolder, opts.weight_dtype)


def _clip_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str, opts: FluxOptions) -> Any:
    """CLIPTextModel from a clip_l.safetensors (transformers layout, with or without the text_model. level)."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        expected = set(CLIPTextModel(CLIPTextModel.config_class.from_pretrained(
            os.path.join(config_dir, "text_encoder"), local_files_only=True)).state_dict())
    nested = any(k.startswith("text_model.") for k in expected)
    weights = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection") or key.endswith("position_ids"):
            continue   # CLIP-L files sometimes carry the projection; Flux uses the unprojected pooled output
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        weights[("text_model." + bare) if nested else bare] = value
    return loading.model_from_config(CLIPTextModel, config_dir, "text_encoder", weights, opts.weight_dtype,
                                     "--clip_l")


def _transformer_from_bfl(state_dict: dict[str, torch.Tensor], config_dir: str, opts: FluxOptions) -> Any:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    try:
        converted, left = flux_convert.bfl_to_diffusers(state_dict)
    except KeyError as err:
        raise UserError(f"{SOURCE_FLAG}: not a complete Flux / Chroma transformer in the BFL layout (missing "
                        f"{err}); pass flux1-dev.safetensors, flux1-schnell.safetensors, Chroma.safetensors or a "
                        "diffusers folder") from err
    left = [k for k in left if not k.startswith(("first_stage_model.", "text_encoders.", "cond_stage_model."))]
    if left:
        raise UserError(f"{SOURCE_FLAG}: {len(left)} transformer weights do not belong to the Flux layout (e.g. "
                        f"{left[:3]}); is this a Flux fill/depth or Flux.2 checkpoint? Those are not supported")
    cls = ChromaTransformer2DModel if opts.model_type == "chroma" else FluxTransformer2DModel
    return loading.model_from_config(cls, config_dir, "transformer", converted, opts.weight_dtype, SOURCE_FLAG)


def _check_model_type(layout: flux_convert.BFLLayout, opts: FluxOptions, where: str) -> None:
    if layout.chroma != (opts.model_type == "chroma"):
        want = "chroma" if layout.chroma else "flux"
        raise UserError(f"--model_type {opts.model_type}: {where} is a {'Chroma' if layout.chroma else 'Flux.1'} "
                        f"model; pass --model_type {want}")


def _layout_of_single_file(opts: FluxOptions, checkpoint: dict[str, torch.Tensor]) -> flux_convert.BFLLayout:
    layout = flux_convert.detect_layout(flux_convert.strip_prefix(checkpoint))
    if layout is None:
        raise UserError(f"{SOURCE_FLAG}: no Flux transformer weights (double_blocks.*) in the file; pass a BFL "
                        "single file (flux1-dev.safetensors, Chroma.safetensors) or a diffusers folder")
    _check_model_type(layout, opts, f"'{opts.pretrained_model_name_or_path}'")
    return layout


def _load_single_file(opts: FluxOptions, path: str) -> tuple:
    checkpoint = loading.load_single_file_state_dict(path, opts.allow_pickle, SOURCE_FLAG, lazy=True)
    layout = _layout_of_single_file(opts, checkpoint)
    config_dir = loading.config_dir_for("chroma" if layout.chroma else f"flux-{layout.variant}", opts.model_config)
    transformer = _transformer_from_bfl(checkpoint, config_dir, opts)
    del checkpoint
    chroma = layout.chroma
    t5_subfolder = "text_encoder" if chroma else "text_encoder_2"
    if not opts.t5xxl:
        raise UserError("--t5xxl: required with a single-file checkpoint (e.g. t5xxl_fp16.safetensors)")
    if not (opts.ae or opts.vae):
        raise UserError("--ae: required with a single-file checkpoint (e.g. ae.safetensors)")
    encoders, tokenizers = [], []
    if not chroma:
        if not opts.clip_l:
            raise UserError("--clip_l: required for Flux with a single-file checkpoint (e.g. clip_l.safetensors)")
        encoders.append(_clip_from_state_dict(loading.load_single_file_state_dict(
            os.path.expanduser(opts.clip_l), opts.allow_pickle, "--clip_l", lazy=True), config_dir, opts))
        tokenizers.append(loading.load_clip_tokenizer(config_dir, "tokenizer"))
    tokenizers.append(_t5_tokenizer([(config_dir, "tokenizer" if chroma else "tokenizer_2")],
                                    opts.tokenizer_cache_dir))
    encoders.append(_t5_from_state_dict(loading.load_single_file_state_dict(
        os.path.expanduser(opts.t5xxl), opts.allow_pickle, "--t5xxl", lazy=True), config_dir, t5_subfolder, opts))
    return transformer, encoders, tokenizers, config_dir, layout.variant


def _transformer_class_name(root: str) -> str:
    path = os.path.join(root, "transformer", "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{SOURCE_FLAG}: '{root}' has no transformer/config.json; pass a diffusers Flux or Chroma "
                        "folder, or a BFL single file")
    with open(path, encoding="utf-8") as f:
        return str(json.load(f).get("_class_name", ""))


def _load_diffusers(opts: FluxOptions, root: str) -> tuple:
    """A diffusers Flux / Chroma folder; --clip_l / --t5xxl files replace its encoders' weights."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    if opts.model_config:
        raise UserError(f"--model_config: only used for single-file checkpoints; '{root}' is a diffusers folder with "
                        "its own configs; drop --model_config")
    is_chroma = "Chroma" in _transformer_class_name(root)
    _check_model_type(flux_convert.BFLLayout(chroma=is_chroma, guidance=False, num_double=0, num_single=0), opts,
                      f"'{root}'")
    cls = ChromaTransformer2DModel if is_chroma else FluxTransformer2DModel
    transformer = loading.load_component(cls, root, "transformer", opts.weight_dtype, opts.allow_pickle, SOURCE_FLAG)
    encoders, tokenizers = [], []
    t5_subfolder = "text_encoder" if is_chroma else "text_encoder_2"
    if not is_chroma:
        encoders.append(_clip_from_state_dict(loading.load_single_file_state_dict(
            os.path.expanduser(opts.clip_l), opts.allow_pickle, "--clip_l", lazy=True), root, opts) if opts.clip_l else
            loading.load_component(CLIPTextModel, root, "text_encoder", opts.weight_dtype, opts.allow_pickle,
                                   SOURCE_FLAG))
        tokenizers.append(loading.load_clip_tokenizer(root, "tokenizer", flag=SOURCE_FLAG))
    tokenizers.append(_t5_tokenizer([(root, "tokenizer" if is_chroma else "tokenizer_2")], opts.tokenizer_cache_dir))
    encoders.append(_t5_from_state_dict(loading.load_single_file_state_dict(
        os.path.expanduser(opts.t5xxl), opts.allow_pickle, "--t5xxl", lazy=True), root, t5_subfolder, opts)
        if opts.t5xxl else
        loading.load_component(T5EncoderModel, root, t5_subfolder, opts.weight_dtype, opts.allow_pickle, SOURCE_FLAG))
    variant = "chroma" if is_chroma else ("dev" if transformer.config.guidance_embeds else "schnell")
    return transformer, encoders, tokenizers, root, variant


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------
class FluxAdapter:
    name = "flux"
    kind = "flow"
    bucket_reso_steps = 64   # VAE /8 and 2×2 patches need multiples of 16; 64 as KS's default

    def prediction_type(self, opts: FluxOptions) -> str:
        return prediction_type_for(opts.model_prediction_type)

    def load(self, opts: FluxOptions) -> Models:
        """Transformer, AE, text encoders and tokenizers from a diffusers folder or BFL single files, offline."""
        check(opts)
        for note in notes(opts):
            print(f"note: {note}")
        kind, path = loading.resolve_model_source(opts.pretrained_model_name_or_path, opts.allow_pickle)
        loader = _load_single_file if kind == "single_file" else _load_diffusers
        transformer, encoders, tokenizers, config_dir, variant = loader(opts, path)
        if opts.ae or opts.vae:
            flag = "--ae" if opts.ae else "--vae"
            vae = loading.load_vae(opts.ae or opts.vae, config_dir, opts.allow_pickle, opts.weight_dtype, flag)
        else:
            from diffusers import AutoencoderKL
            vae = loading.load_component(AutoencoderKL, path, "vae", opts.weight_dtype, opts.allow_pickle, SOURCE_FLAG)
        for module in (transformer, vae, *encoders):
            module.requires_grad_(False)
        max_length = opts.t5xxl_max_token_length or (256 if variant == "schnell" else 512)
        from diffusers import FlowMatchEulerDiscreteScheduler
        scheduler_config = loading.read_scheduler_config(config_dir, SOURCE_FLAG)
        return Models(denoiser=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      alphas_cumprod=None,
                      scheduler_config=dict(FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config),
                      extra={"variant": variant, "t5xxl_max_token_length": max_length,
                             "apply_t5_attn_mask": opts.apply_t5_attn_mask or variant == "chroma",
                             "guidance_scale": float(opts.guidance_scale),
                             "additive": opts.model_prediction_type == "additive",
                             "metadata": modelspec_keys(variant)})

    def encode_images(self, models: Models, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) − shift_factor)·scaling_factor in fp32, E(x) a posterior sample (KS flux_models.AutoEncoder)."""
        vae = models.vae
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).to(torch.float32)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def tokenize(self, models: Models, captions: list[str]) -> list[torch.Tensor]:
        """Flux: [CLIP ids (77), T5 ids, T5 mask]; Chroma: [T5 ids, T5 mask] (KS FluxTokenizeStrategy)."""
        out = []
        tokenizers = models.tokenizers
        if len(tokenizers) > 1:
            clip = tokenizers[0]
            out.append(clip(captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids)
        t5 = tokenizers[-1](captions, padding="max_length", max_length=models.extra["t5xxl_max_token_length"],
                            truncation=True, return_tensors="pt")
        return out + [t5.input_ids, t5.attention_mask]

    def encode_text(self, models: Models, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{encoder_hidden_states: T5 [B, L, D], text_mask: [B, L] (1 = attend; Chroma: caption + one padding
        token), pooled_projections: CLIP-L pooled [B, 768] (Flux only)}; per-sample sliceable (caching)."""
        t5 = models.text_encoders[-1]
        ids, mask = tokens[-2], tokens[-1]
        masked = models.extra["apply_t5_attn_mask"]
        hidden = t5(ids.to(t5.device), attention_mask=mask.to(t5.device) if masked else None)[0]
        variant = models.extra["variant"]
        text_mask = chroma_text_mask(mask) if variant == "chroma" else mask
        out = {"encoder_hidden_states": hidden, "text_mask": text_mask.to(hidden.device, torch.float32)}
        if len(models.text_encoders) > 1:
            clip = models.text_encoders[0]
            out["pooled_projections"] = clip(tokens[0].to(clip.device)).pooler_output
        return out

    def encode_text_with_cache(self, models: Models, tokens: list[torch.Tensor],
                               cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """KS's partial text-encoder cache: the T5 outputs come from the cache, CLIP-L (whose LoRA may train) runs
        on every step. A T5 LoRA (train_t5xxl) cannot train from a cache (KS refuses it too)."""
        t5 = models.text_encoders[-1]
        if any(getattr(vars(m).get("forward"), "is_lora", False) for m in t5.modules()):  # a LoRA-patched layer
            raise UserError("--cache_text_encoder_outputs: T5-XXL is trained (network_args train_t5xxl=True), so "
                            "its outputs cannot come from a cache; drop one of them")
        if len(models.text_encoders) == 1:
            return cached
        clip = models.text_encoders[0]
        return {**cached, "pooled_projections": clip(tokens[0].to(clip.device)).pooler_output}

    def predict(self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """The transformer's output unpacked to [B, C, H, W] (+ x_σ with --model_prediction_type additive).
        timesteps are 1000σ (the engine's flow convention); the transformer takes σ."""
        transformer = models.denoiser
        param = next(transformer.parameters())
        device, dtype = param.device, param.dtype
        b, _, h, w = noisy_latents.shape
        hidden = conditioning["encoder_hidden_states"].to(device, dtype)
        kwargs: dict[str, Any] = dict(hidden_states=pack_latents(noisy_latents.to(device, dtype)),
                                      encoder_hidden_states=hidden,
                                      timestep=(timesteps.to(device, torch.float32) / 1000.0).to(dtype),
                                      img_ids=image_ids(h, w, device, dtype),
                                      txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
                                      return_dict=False)
        text_keep = conditioning["text_mask"].to(device).bool()
        image_keep = torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool, device=device)
        if models.extra["variant"] == "chroma":
            kwargs["attention_mask"] = torch.cat([text_keep, image_keep], dim=1)
        else:
            kwargs["pooled_projections"] = conditioning["pooled_projections"].to(device, dtype)
            if transformer.config.guidance_embeds:
                kwargs["guidance"] = torch.full((b,), models.extra["guidance_scale"], device=device, dtype=dtype)
            if models.extra["apply_t5_attn_mask"]:
                # padded text keys are masked for every query (KS DoubleStreamBlock / SingleStreamBlock)
                keep = torch.cat([text_keep, image_keep], dim=1)
                kwargs["joint_attention_kwargs"] = {"attention_mask": keep[:, None, None, :]}
        out = unpack_latents(transformer(**kwargs)[0], h, w)
        if models.extra["additive"]:
            out = out + noisy_latents.to(out)
        return out

    def pipeline(self, models: Models) -> Any:
        """FluxPipeline / ChromaPipeline over the same modules."""
        from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.scheduler_config)
        if models.extra["variant"] == "chroma":
            return ChromaPipeline(scheduler=scheduler, vae=models.vae, text_encoder=models.text_encoders[0],
                                  tokenizer=models.tokenizers[0], transformer=models.denoiser)
        return FluxPipeline(scheduler=scheduler, vae=models.vae, text_encoder=models.text_encoders[0],
                            tokenizer=models.tokenizers[0], text_encoder_2=models.text_encoders[1],
                            tokenizer_2=models.tokenizers[1], transformer=models.denoiser)

    def pipeline_kwargs(self, models: Models) -> dict[str, Any]:
        """Sample as trained: the T5 length."""
        return {"max_sequence_length": models.extra["t5xxl_max_token_length"]}


ADAPTER = FluxAdapter()


# ----------------------------------------------------------------------------------------------
# Registry entry
# ----------------------------------------------------------------------------------------------
FLUX_BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "ChromaTransformerBlock",
                      "ChromaSingleTransformerBlock")


def peft_targets(transformer: torch.nn.Module, include_conv: bool = False) -> list:
    """For --network_module networks.lora on Flux / Chroma: every Linear of the transformer blocks, named by its
    diffusers path (PEFT keys ``transformer.<path>.lora_A/B``, which diffusers and ComfyUI load at any width).
    KS-format files come from networks.lora_flux."""
    from networks.lora_keys import LoraTarget, _linear_or_conv_in

    return [LoraTarget("lora_unet_" + path.replace(".", "_"), module, path, "transformer", "linear",
                       f"transformer.{path}")
            for path, module in _linear_or_conv_in(transformer, FLUX_BLOCK_CLASSES)
            if isinstance(module, torch.nn.Linear)]


def is_flux_transformer(denoiser: torch.nn.Module) -> bool:
    return type(denoiser).__name__ == "FluxTransformer2DModel"


def base_model_version(args: argparse.Namespace) -> str:
    """KS flux_utils: MODEL_VERSION_FLUX_V1 'flux1', MODEL_VERSION_CHROMA 'chroma'."""
    return "chroma" if getattr(args, "model_type", "flux") == "chroma" else "flux1"


def modelspec_keys(variant: str) -> dict[str, str]:
    """The modelspec keys KS writes for a Flux.1 dev / schnell or Chroma LoRA (KS flux_train_network
    get_sai_model_spec: flux="dev" | "schnell" | "chroma")."""
    return {"modelspec.architecture": MODELSPEC_ARCHITECTURES[variant] + "/lora",
            "modelspec.implementation": IMPL_CHROMA if variant == "chroma" else IMPL_FLUX}


def extra_metadata(args: argparse.Namespace) -> dict:
    """KS flux_train_network.update_metadata's model keys (the loss / timestep ones come from the loss config)."""
    return {"ss_model_type": args.model_type, "ss_apply_t5_attn_mask": args.apply_t5_attn_mask,
            "ss_guidance_scale": args.guidance_scale, "ss_model_prediction_type": args.model_prediction_type,
            "ss_discrete_flow_shift": args.discrete_flow_shift,
            "ss_t5xxl_max_token_length": args.t5xxl_max_token_length}


def write_tiny_model(out: str, seed: int = 0, single_file: str | None = None, model_config_out: str | None = None,
                     variant: str = "dev") -> dict:
    """A tiny Flux (dev / schnell) or Chroma diffusers folder; with single_file also the BFL files KS trains from
    (the transformer there, ae / clip_l / t5xxl .safetensors beside it) and their --model_config folder."""
    from library import tiny_flux
    from library.tiny_models import save_tiny_pipeline

    pipe = tiny_flux.build(variant, seed)
    paths = save_tiny_pipeline(pipe, out)
    if single_file:
        folder = os.path.dirname(os.path.abspath(single_file))
        files = tiny_flux.write_bfl_files(pipe, folder, model_config_out or os.path.splitext(single_file)[0]
                                          + "_config")
        os.replace(files.pop("transformer"), single_file)
        paths.update(single_file=single_file, model_config=files.pop("model_config"), **files)
    return paths


# ----------------------------------------------------------------------------------------------
# Recognising Flux.1 / Chroma checkpoints before loading (library/families/detect.py asks)
# ----------------------------------------------------------------------------------------------
def checkpoint_is_chroma(ckpt) -> bool | None:
    """True (Chroma) / False (Flux.1) for a diffusers folder or a BFL single file, None when it is neither
    (diffusers: the pipeline or transformer class; single files: KS flux_utils.analyze_checkpoint_state's names)."""
    if ckpt.kind == "diffusers":
        names = (ckpt.pipeline_class, str(ckpt.config("transformer").get("_class_name", "")))
        if any(n.startswith("Chroma") for n in names):
            return True
        return False if any(n.startswith("Flux") for n in names) else None
    layout = flux_convert.detect_layout(flux_convert.strip_prefix(dict.fromkeys(ckpt.keys)))
    return None if layout is None else layout.chroma


def recognise_checkpoint(ckpt) -> Any:
    """Flux.1 folders and files (dev, schnell); Chroma's are the chroma entry's."""
    from library.families import detect
    return detect.Detected(FluxAdapter.name, "Flux.1") if checkpoint_is_chroma(ckpt) is False else None


def check_model_type_of_checkpoint(opts: FluxOptions) -> None:
    """Before loading: --model_type agrees with the checkpoint (a Chroma file needs --model_type chroma)."""
    from library.families import detect
    found = detect.detect(opts.pretrained_model_name_or_path) if opts.pretrained_model_name_or_path else None
    if found is not None and found.family in (FluxAdapter.name, "chroma"):
        _check_model_type(flux_convert.BFLLayout(chroma=found.family == "chroma", guidance=False, num_double=0,
                                                 num_single=0), opts, f"'{opts.pretrained_model_name_or_path}'")


class FluxFamily(Family):
    def text_encoder_cache_key(self, args: argparse.Namespace) -> str:
        """Cached T5 / CLIP outputs depend on the model type, the T5 length and the mask."""
        return (f"{getattr(args, 'model_type', 'flux')}-te-{args.t5xxl_max_token_length}-"
                f"mask{int(bool(args.apply_t5_attn_mask))}")


FAMILY = FluxFamily(
    adapter_class=FluxAdapter, entry_script="flux_train_network.py", prediction_types=("flow", "flow_x0"),
    options_class=FluxOptions, add_arguments=add_arguments, check=check, text_encoder_cache=True,
    lora_unet_targets=peft_targets, lora_file_format="peft", detects=is_flux_transformer,
    recognise=recognise_checkpoint,
    base_model_version=base_model_version, extra_metadata=extra_metadata, write_tiny_model=write_tiny_model,
    modelspec_architecture=lambda args: "flux-1", modelspec_implementation=IMPL_FLUX,  # until the model is read
    tiny_model_flags=("single_file", "model_config_out"), default_resolution=1024, latent_channels=16)

"""The SD3 family adapter: MMDiT transformer, rectified flow, CLIP-L + CLIP-G + optional T5-XXL.

Text conditioning follows diffusers' StableDiffusion3Pipeline.encode_prompt (clip_skip None), which matches SAI's
reference sd3_impls: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to the T5 width, then
the T5 sequence after them (zeros when T5 is absent); pooled = [CLIP-L pooled, CLIP-G projected pooled].
Latents: (VAE sample − shift_factor)·scaling_factor (diffusers examples/dreambooth/train_dreambooth_lora_sd3.py).
See docs/sd3.md.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError
from library.families import detect, loading, sd3_flags
from library.families.base import Family, ModelOptions, Models
from library.sd3_convert import CLIP_G_PREFIX, CLIP_L_PREFIX, MMDIT_PREFIX, T5_PREFIX
from networks import lora_keys

FAMILY_KEY = "sd3"   # configs/models/sd3: SD3 medium architecture
SD35_CONFIG_KEYS = ("sd35_medium", "sd35_large")   # configs/models/<key>: SD3.5 medium (MMDiT-X) and large
# The CLIP BPE files are shipped once, with SD1.5; SD3's CLIP-G tokenizer differs only by padding with '!'
# (as SDXL's tokenizer_2; SAI's SDXLClipGTokenizer pads with token 0).
# Offline-only fallbacks for the T5 tokenizer: looked up in the local Hugging Face cache, never downloaded.
CACHED_T5_TOKENIZERS = (("stabilityai/stable-diffusion-3-medium-diffusers", "tokenizer_3"),
                        ("google/t5-v1_1-xxl", ""))
NO_T5 = "none"       # --t5xxl none: run without T5 even when the checkpoint has it
SOURCE_FLAG = "--pretrained_model_name_or_path"


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------
@dataclass
class SD3Options(ModelOptions):
    """The common model flags plus SD3's own (add_arguments)."""
    precondition_outputs: bool = False
    t5xxl_max_token_length: int = 256
    clip_l: str | None = None            # separate text-encoder files (KS flags)
    clip_g: str | None = None
    t5xxl: str | None = None             # a file, or "none" to train without T5
    lora_format: str = "peft"            # LoRA file keys: peft (diffusers) | kohya (KS networks.lora_sd3)
    # KS sd3_train_network.py flags (library/families/sd3_flags.py)
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    t5xxl_dtype: str | None = None
    clip_l_dropout_rate: float = 0.0
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0
    pos_emb_random_crop_rate: float = 0.0
    enable_scaled_pos_embed: bool = False
    blocks_to_swap: int | None = None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """SD3's own model flags (KS sd3_train_network.py)."""
    group.add_argument("--precondition_outputs", action="store_true",
                       help="x0 preconditioning: prediction x0 = x_sigma - sigma * F, target x0 (KS SD3 behaviour)")
    group.add_argument("--t5xxl_max_token_length", type=int, default=256, help="T5 sequence length")
    group.add_argument("--clip_l", type=str, default=None, help="CLIP-L weights when the checkpoint has none")
    group.add_argument("--clip_g", type=str, default=None, help="CLIP-G weights when the checkpoint has none")
    group.add_argument("--t5xxl", type=str, default=None, help="T5-XXL weights, or 'none' to train without T5")
    group.add_argument("--lora_format", type=str, default="peft", choices=("peft", "kohya"),
                       help="LoRA file keys: peft (transformer.*.lora_A/B: diffusers and ComfyUI load it; default) or "
                            "kohya (KS lora_unet_joint_blocks_*: KS and ComfyUI; needs --network_module "
                            "networks.lora_sd3). docs/lora-format.md")
    sd3_flags.add_arguments(group)
    # KS sd3_train_network.py flags that are no-ops or refused here (library/ks_compat.py says why, and checks)
    group.add_argument("--disable_mmap_load_safetensors", action="store_true")
    group.add_argument("--text_encoder_batch_size", type=int, default=None)
    group.add_argument("--save_clip", action="store_true")
    group.add_argument("--save_t5xxl", action="store_true")
    group.add_argument("--t5xxl_device", type=str, default=None)


def _component_path(opts: SD3Options, name: str) -> str | None:
    """KS sd3 flags --clip_l / --clip_g / --t5xxl (separate text-encoder files); "" counts as not given."""
    return getattr(opts, name) or None


def check_options(opts: SD3Options) -> None:
    """Reject model flags that mean nothing for SD3 (spec §0: silent ignores are bugs)."""
    rejected = {
        "--v_parameterization": (opts.v_parameterization, "SD3 is a flow model (target ε − x0); drop it"),
        "--zero_terminal_snr": (opts.zero_terminal_snr, "it rescales a DDPM schedule; SD3 uses flow σ"),
        "--max_token_length": (opts.max_token_length is not None,
                               "SD3's CLIP encoders take 77 tokens; use --t5xxl_max_token_length for T5"),
    }
    for flag, (given, why) in rejected.items():
        if given:
            raise UserError(f"{flag}: not supported for SD3: {why}")
    sd3_flags.check(opts)
    if opts.t5xxl_max_token_length < 1:
        raise UserError(f"--t5xxl_max_token_length: must be ≥ 1, got {opts.t5xxl_max_token_length}; 256 is the "
                        "SD3 default (77 is enough for short captions)")


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
def _t5_tokenizer(folder: str) -> Any:
    """The T5 tokenizer in folder/tokenizer_3, else one in the local HF cache, else a UserError: it is not
    shipped (a sentencepiece model) and cannot be downloaded."""
    from transformers import T5TokenizerFast

    if any(os.path.isfile(os.path.join(folder, "tokenizer_3", name)) for name in ("tokenizer.json", "spiece.model")):
        return loading.load_tokenizer(T5TokenizerFast, folder, "tokenizer_3")
    for repo, subfolder in CACHED_T5_TOKENIZERS:
        try:
            return T5TokenizerFast.from_pretrained(repo, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise UserError(f"{SOURCE_FLAG}: T5-XXL weights are given but no T5 tokenizer is available offline (no "
                    f"tokenizer_3/ in '{folder}', none in the local Hugging Face cache); use a diffusers SD3 folder "
                    "that has tokenizer_3/ (as --pretrained_model_name_or_path, or as --model_config for a single "
                    "file), or run without T5 (--t5xxl none)")


# ----------------------------------------------------------------------------------------------
# Single-file components
# ----------------------------------------------------------------------------------------------
def _with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def _component_state_dict(opts: SD3Options, name: str, checkpoint: dict[str, torch.Tensor],
                          prefix: str) -> dict[str, torch.Tensor] | None:
    """The `prefix`-stripped weights of a text encoder: from its own file (--clip_l/--clip_g/--t5xxl; bare
    transformers keys or SAI-prefixed) or from the main checkpoint. None when neither has them."""
    path = _component_path(opts, name)
    if path is not None and path != NO_T5:
        state_dict = loading.load_single_file_state_dict(os.path.expanduser(path), opts.allow_pickle, f"--{name}",
                                                          lazy=True)
        prefixed = _with_prefix(state_dict, prefix)
        return {k[len(prefix):]: v for k, v in prefixed.items()} if prefixed else state_dict
    prefixed = _with_prefix(checkpoint, prefix)
    return {k[len(prefix):]: v for k, v in prefixed.items()} or None


def shipped_config_key(checkpoint: dict[str, torch.Tensor]) -> str:
    """configs/models/<key> for an SAI file: sd35_medium / sd35_large when diffusers' infer_diffusers_model_type
    recognises the file as one (by its real sizes), else sd3 (SD3 medium)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    detected = infer_diffusers_model_type(_with_prefix(checkpoint, MMDIT_PREFIX))
    return detected if detected in SD35_CONFIG_KEYS else FAMILY_KEY


def _mmdit_from_checkpoint(checkpoint: dict[str, torch.Tensor], config_dir: str, opts: SD3Options) -> Any:
    """SD3Transformer2DModel from `model.diffusion_model.*` via diffusers' own converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    mmdit = _with_prefix(checkpoint, MMDIT_PREFIX)
    if not mmdit:
        raise UserError(f"{SOURCE_FLAG}: no MMDiT weights ({MMDIT_PREFIX}*) in the checkpoint; pass an SD3 "
                        "single file (e.g. sd3_medium.safetensors) or a diffusers folder")
    try:
        # the converter pops from its input: hand it a copy
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))
    except KeyError as err:
        raise UserError(f"{SOURCE_FLAG}: the MMDiT weights are incomplete (missing {err}); the file is not an SD3 "
                        "checkpoint in the SAI layout") from err
    return loading.model_from_config(SD3Transformer2DModel, config_dir, "transformer", converted,
                                     opts.weight_dtype, SOURCE_FLAG)


def _clip_from_state_dict(state_dict: dict[str, torch.Tensor] | None, config_dir: str, subfolder: str,
                          flag: str, opts: SD3Options, identity_projection: bool) -> Any:
    """CLIPTextModelWithProjection from transformers-layout keys (`text_model.*`, `text_projection.weight`).

    identity_projection: SD3 uses CLIP-L's pooled output unprojected (SAI sd3_impls return_projected_pooled=False;
    diffusers' single-file loader writes an identity projection too)."""
    from transformers import CLIPTextModelWithProjection

    if state_dict is None:
        raise UserError(f"{flag}: the checkpoint has no {subfolder} weights; pass a single file that includes "
                        f"the CLIP encoders (e.g. sd3_medium_incl_clips.safetensors), {flag} FILE, or a diffusers "
                        "folder")
    # transformers >= 5.6 may flatten `text_model.`; CLIPTextModelWithProjection keeps it (checked by the keys)
    weights = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
               for k, v in state_dict.items() if not k.endswith("position_ids")}
    if identity_projection:
        width = weights["text_model.final_layer_norm.weight"].shape[0]
        weights["text_projection.weight"] = torch.eye(width, dtype=weights["text_model.final_layer_norm.weight"].dtype)
    return loading.model_from_config(CLIPTextModelWithProjection, config_dir, subfolder, weights,
                                     opts.weight_dtype, flag)


def _t5_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str, opts: SD3Options) -> Any:
    return loading.t5_from_state_dict(state_dict, config_dir, "text_encoder_3", opts.weight_dtype)


def _to(mask: torch.Tensor | None, module: torch.nn.Module) -> torch.Tensor | None:
    return None if mask is None else mask.to(module.device)


def _t5_in_dtype(t5: Any, dtype: torch.dtype) -> Any:
    """--t5xxl_dtype: T5 in that dtype; in fp16 its feed-forward output stays fp32 (transformers'
    _keep_in_fp32_modules, as from_pretrained does)."""
    t5.to(dtype)
    return loading.keep_t5_fp32_modules(t5) if dtype == torch.float16 else t5


def _load_single_file(opts: SD3Options, path: str) -> tuple[Any, Any, list, list, dict, str]:
    """(transformer, vae, text encoders, tokenizers, scheduler config, architecture dir) from an SAI file."""
    checkpoint = loading.load_single_file_state_dict(path, opts.allow_pickle, SOURCE_FLAG, lazy=True)
    config_dir = loading.config_dir_for(shipped_config_key(checkpoint), opts.model_config)
    transformer = _mmdit_from_checkpoint(checkpoint, config_dir, opts)
    vae = None if opts.vae else loading.vae_from_single_file_state_dict(
        _with_prefix(checkpoint, "first_stage_model."), config_dir, opts.weight_dtype, SOURCE_FLAG)
    clip_l = _clip_from_state_dict(_component_state_dict(opts, "clip_l", checkpoint, CLIP_L_PREFIX), config_dir,
                                   "text_encoder", "--clip_l", opts, identity_projection=True)
    clip_g = _clip_from_state_dict(_component_state_dict(opts, "clip_g", checkpoint, CLIP_G_PREFIX), config_dir,
                                   "text_encoder_2", "--clip_g", opts, identity_projection=False)
    encoders = [clip_l, clip_g]
    tokenizers = [loading.load_clip_tokenizer(config_dir, "tokenizer"),
                  loading.load_clip_tokenizer(config_dir, "tokenizer_2", "!")]  # CLIP-G pads with "!"
    if _component_path(opts, "t5xxl") != NO_T5:
        t5_weights = _component_state_dict(opts, "t5xxl", checkpoint, T5_PREFIX)
        if t5_weights:
            tokenizers.append(_t5_tokenizer(config_dir))   # first: a missing tokenizer fails before T5 loads
            encoders.append(_t5_from_state_dict(t5_weights, config_dir, opts))
    return transformer, vae, encoders, tokenizers, loading.read_scheduler_config(config_dir, "--model_config"), \
        config_dir


def _load_diffusers(opts: SD3Options, root: str) -> tuple[Any, Any, list, list, dict, str]:
    """The same from a diffusers folder (its own configs); T5 is used when text_encoder_3/ exists, unless
    --t5xxl none (drop it) or --t5xxl FILE (weights from that file, architecture from text_encoder_3/config.json)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if opts.model_config:
        raise UserError(f"--model_config: only used for single-file checkpoints; '{root}' is a diffusers folder "
                        "with its own configs; drop --model_config")

    def component(cls: Any, subfolder: str) -> Any:
        return loading.load_component(cls, root, subfolder, opts.weight_dtype, opts.allow_pickle, SOURCE_FLAG)

    transformer = component(SD3Transformer2DModel, "transformer")
    vae = None if opts.vae else component(AutoencoderKL, "vae")
    encoders = [component(CLIPTextModelWithProjection, "text_encoder"),
                component(CLIPTextModelWithProjection, "text_encoder_2")]
    tokenizers = [loading.load_clip_tokenizer(root, "tokenizer", flag=SOURCE_FLAG),
                  loading.load_clip_tokenizer(root, "tokenizer_2", "!", SOURCE_FLAG)]
    t5_path = _component_path(opts, "t5xxl")
    if t5_path is not None and t5_path != NO_T5:
        tokenizers.append(_t5_tokenizer(root))
        encoders.append(_t5_from_state_dict(_component_state_dict(opts, "t5xxl", {}, T5_PREFIX), root, opts))
    elif t5_path is None and os.path.isdir(os.path.join(root, "text_encoder_3")):
        tokenizers.append(_t5_tokenizer(root))
        encoders.append(component(T5EncoderModel, "text_encoder_3"))
    return transformer, vae, encoders, tokenizers, loading.read_scheduler_config(root), root


def flow_scheduler_config(config: dict) -> dict:
    """The FlowMatchEulerDiscreteScheduler config (with its defaults filled in) of a scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.from_config(config).config)


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------
class SD3Adapter:
    name = "sd3"
    kind = "flow"
    bucket_reso_steps = 64   # VAE /8 and 2×2 patches need multiples of 16; 64 keeps SD3's buckets coarse

    def prediction_type(self, opts: SD3Options) -> str:
        """'flow' (velocity ε − x0), or 'flow_x0' with --precondition_outputs (x̂0 = x_σ − σ·F, KS SD3)."""
        return "flow_x0" if opts.precondition_outputs else "flow"

    def load(self, opts: SD3Options) -> Models:
        """MMDiT, VAE, CLIP-L, CLIP-G and optional T5 from a diffusers folder or an SAI single file, offline."""
        check_options(opts)
        kind, path = loading.resolve_model_source(opts.pretrained_model_name_or_path, opts.allow_pickle)
        loader = _load_single_file if kind == "single_file" else _load_diffusers
        transformer, vae, encoders, tokenizers, scheduler_config, config_dir = loader(opts, path)
        if opts.vae:
            vae = loading.load_vae(opts.vae, config_dir, opts.allow_pickle, opts.weight_dtype)
        for module in (transformer, vae, *encoders):
            module.requires_grad_(False)   # the network wrapper decides what trains
        sd3_flags.load_note(opts)
        if len(encoders) > 2 and sd3_flags.t5_dtype(opts) is not None:
            encoders[2] = _t5_in_dtype(encoders[2], sd3_flags.t5_dtype(opts))
        sd3_flags.install_pos_emb_random_crop(transformer, opts.pos_emb_random_crop_rate)
        clip_l, clip_g = encoders[:2]
        return Models(denoiser=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      alphas_cumprod=None, scheduler_config=flow_scheduler_config(scheduler_config),
                      extra={"t5xxl_max_token_length": opts.t5xxl_max_token_length,
                             "joint_attention_dim": transformer.config.joint_attention_dim,
                             "clip_widths": (clip_l.config.hidden_size, clip_g.config.hidden_size),
                             "pooled_widths": (clip_l.config.projection_dim, clip_g.config.projection_dim),
                             "clip_length": tokenizers[0].model_max_length,
                             "metadata": {"modelspec.architecture": modelspec_architecture(transformer)},
                             **sd3_flags.extra(opts, tokenizers)})

    def encode_images(self, models: Models, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) − shift_factor)·scaling_factor in fp32, E(x) a sample of the VAE posterior (SD3 VAE: shift
        0.0609, scale 1.5305); diffusers train_dreambooth_lora_sd3.py, KS sd3 latents. Images in [−1, 1]."""
        vae = models.vae
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).to(torch.float32)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def tokenize(self, models: Models, captions: list[str]) -> list[torch.Tensor]:
        """CLIP-L and CLIP-G ids [B, 77] (max_length padding, truncation, as the pipeline), then T5 ids
        [B, t5xxl_max_token_length] when T5 is loaded."""
        ids = [tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tokenizer in models.tokenizers[:2]]
        if len(models.tokenizers) > 2:
            ids.append(models.tokenizers[2](captions, padding="max_length", truncation=True,
                                            max_length=models.extra["t5xxl_max_token_length"],
                                            add_special_tokens=True, return_tensors="pt").input_ids)
        return ids

    def encode_text(self, models: Models, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """StableDiffusion3Pipeline.encode_prompt (clip_skip None), batched:
        c = [pad(cat(h_L[-2], h_G[-2]), to D_T5) ; T5(ids) or 0^{B×N×D}] along the sequence, D = joint_attention_dim;
        pooled = cat(pooled_L, pooled_G). Both [B, ...]: per-sample sliceable for text-encoder caching."""
        clip_l, clip_g = models.text_encoders[:2]
        masks = [None] * len(tokens)   # --apply_lg_attn_mask / --apply_t5_attn_mask (KS): padding masks
        for i, flag in enumerate(("apply_lg_attn_mask", "apply_lg_attn_mask", "apply_t5_attn_mask")[:len(tokens)]):
            if models.extra.get(flag):
                masks[i] = sd3_flags.mask_through_eos(tokens[i], models.extra["eos_token_ids"][i])
        out_l = clip_l(tokens[0].to(clip_l.device), attention_mask=_to(masks[0], clip_l), output_hidden_states=True)
        out_g = clip_g(tokens[1].to(clip_g.device), attention_mask=_to(masks[1], clip_g), output_hidden_states=True)
        clip_hidden = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1).to(clip_l.dtype)
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)
        if len(models.text_encoders) > 2:
            t5 = models.text_encoders[2]
            t5_hidden = t5(tokens[2].to(t5.device), attention_mask=_to(masks[2], t5))[0]
        else:
            # diffusers' pipeline with text_encoder_3=None: zeros [B, max_sequence_length, joint_attention_dim]
            t5_hidden = torch.zeros(tokens[0].shape[0], models.extra["t5xxl_max_token_length"],
                                    models.extra["joint_attention_dim"], device=clip_hidden.device,
                                    dtype=clip_l.dtype)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], dim=-2),
                "pooled_projections": pooled}

    def predict(self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """F(x_σ, 1000σ, c, pooled): the MMDiT's raw output (a velocity; flow_x0 preconditioning is the
        objective's job). timesteps are float 1000σ, as FlowMatchEulerDiscreteScheduler feeds the model."""
        transformer = models.denoiser
        param = next(transformer.parameters())
        hidden, pooled = conditioning["encoder_hidden_states"], conditioning["pooled_projections"]
        if "clip_widths" in models.extra:   # --clip_l/--clip_g/--t5_dropout_rate (KS), training steps only
            hidden, pooled = sd3_flags.drop_conditioning(models.extra, hidden, pooled, models.extra["clip_widths"],
                                                         models.extra["pooled_widths"], models.extra["clip_length"])
        return transformer(hidden_states=noisy_latents.to(param.device, param.dtype),
                           timestep=timesteps.to(param.device),
                           encoder_hidden_states=hidden.to(param.device, param.dtype),
                           pooled_projections=pooled.to(param.device, param.dtype),
                           return_dict=False)[0]

    def pipeline(self, models: Models) -> Any:
        """StableDiffusion3Pipeline over the same modules (T5 slots None when T5 is absent). Pass
        max_sequence_length=models.extra['t5xxl_max_token_length'] to it to sample as trained."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        has_t5 = len(models.text_encoders) > 2
        return StableDiffusion3Pipeline(
            transformer=models.denoiser, vae=models.vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.scheduler_config),
            text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
            text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1],
            text_encoder_3=models.text_encoders[2] if has_t5 else None,
            tokenizer_3=models.tokenizers[2] if has_t5 else None)

    def pipeline_kwargs(self, models: Models) -> dict[str, Any]:
        """Sample with the trained T5 length."""
        length = models.extra.get("t5xxl_max_token_length")
        return {"max_sequence_length": length} if length else {}


ADAPTER = SD3Adapter()


def write_tiny_model(out: str, seed: int = 0) -> dict:
    from library import tiny_models

    return tiny_models.save_tiny_pipeline(tiny_models.build_sd3(seed), out)


def extra_metadata(args: argparse.Namespace) -> dict:
    """KS sd3_train_network.update_metadata's model keys (the weighting / logit keys come from the loss config)."""
    return {"ss_apply_lg_attn_mask": args.apply_lg_attn_mask, "ss_apply_t5_attn_mask": args.apply_t5_attn_mask,
            # KS writes these always (the loss config only when its sampler uses them; its values then win)
            "ss_logit_mean": args.logit_mean, "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale}


def modelspec_architecture(transformer: Any) -> str:
    """KS sai_model_spec: 'stable-diffusion-3-' + medium | 5-medium | 5-large (KS sd3_utils: qk-norm without
    dual-attention blocks is 3.5 large, with them 3.5 medium, neither: SD3 medium) + '/lora'."""
    config = transformer.config
    if config.get("qk_norm") is None:
        kind = "medium"
    else:
        kind = "5-medium" if config.get("dual_attention_layers") else "5-large"
    return f"stable-diffusion-3-{kind}/lora"


class SD3Family(Family):
    def text_encoder_cache_key(self, args: argparse.Namespace) -> str:
        """Cached outputs depend on the T5 length, the encoder masks and the T5 dtype."""
        return (f"sd3-te-{args.t5xxl_max_token_length}-lg{int(bool(args.apply_lg_attn_mask))}-"
                f"t5{int(bool(args.apply_t5_attn_mask))}-{args.t5xxl_dtype or 'default'}")


# ----------------------------------------------------------------------------------------------
# Recognising this family's checkpoints before loading (library/families/detect.py asks)
# ----------------------------------------------------------------------------------------------
def recognise_checkpoint(ckpt: detect.Checkpoint) -> detect.Detected | None:
    """This family's diffusers folders and single files, from configs or tensor names (nothing loads)."""
    if ckpt.kind == "diffusers":
        if ckpt.pipeline_class.startswith("StableDiffusion3") or \
                ckpt.config("transformer").get("_class_name") == "SD3Transformer2DModel":
            return detect.Detected(SD3Adapter.name, "SD3")
        return None
    return detect.Detected(SD3Adapter.name, "SD3") if ckpt.has_prefix("model.diffusion_model.joint_blocks.") else None


FAMILY = SD3Family(
    adapter_class=SD3Adapter, entry_script="sd3_train_network.py", prediction_types=("flow", "flow_x0"),
    options_class=SD3Options, add_arguments=add_arguments, check=check_options, text_encoder_cache=True,
    lora_unet_targets=lora_keys.sd3_attention_targets,
    lora_file_format="peft",   # diffusers / PEFT keys: what diffusers and ComfyUI load for SD3
    recognise=recognise_checkpoint, detects=lora_keys.is_sd3_transformer, base_model_version=lambda args: "sd3",
    modelspec_architecture=lambda args: "stable-diffusion-3", extra_metadata=extra_metadata,
    write_tiny_model=write_tiny_model, default_resolution=1024, latent_channels=16)

"""Tiny, randomly initialised Flux.1 (dev / schnell) and Chroma pipelines, built offline from configs.

Same component types and wiring as the real models (diffusers FluxTransformer2DModel / ChromaTransformer2DModel,
a 16-channel AutoencoderKL without quant convs, CLIP-L, T5), only narrow: width 32, two double and two single
blocks. ``write_bfl_files`` writes the same weights as the single files KS trains from (BFL transformer,
``ae.safetensors``, ``clip_l.safetensors``, ``t5xxl.safetensors``), plus the --model_config folder that describes
their architecture.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from library import flux_convert
from library.tiny_models import clip_text_config, make_clip_tokenizer, make_t5_tokenizer, tiny_vae

FLUX_VARIANTS = ("dev", "schnell")
VARIANTS = FLUX_VARIANTS + ("chroma",)
TINY_WIDTH_HEADS, TINY_HEAD_DIM = 2, 16          # width 32
TINY_ROPE_AXES = (4, 6, 6)                       # sums to the head dim, as (16, 56, 56) does for 128
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)   # BFL ae: z = (E(x) − shift)·scale


def _scheduler(variant: str):
    """FlowMatchEulerDiscreteScheduler as in the real repos: dev and Chroma shift with the image size
    (μ from 0.5 at 256 to 1.15 at 4096 tokens), schnell does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant == "schnell":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, dropout_rate=0.0))


def flux_vae():
    vae = tiny_vae(16, sd3=True)
    vae.register_to_config(**FLUX_VAE)
    return vae


def build_flux(seed: int = 0, variant: str = "dev"):
    """A tiny FluxPipeline: dev has the guidance embedding, schnell does not."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if variant not in FLUX_VARIANTS:
        raise ValueError(variant)
    torch.manual_seed(seed)
    clip_tokenizer = make_clip_tokenizer(tempfile.mkdtemp())
    t5_tokenizer, t5_vocab = make_t5_tokenizer(tempfile.mkdtemp())
    clip_l = CLIPTextModel(clip_text_config(len(clip_tokenizer), hidden=32))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_WIDTH_HEADS,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=variant == "dev", axes_dims_rope=TINY_ROPE_AXES)
    return FluxPipeline(scheduler=_scheduler(variant), vae=flux_vae(), text_encoder=clip_l,
                        tokenizer=clip_tokenizer, text_encoder_2=_t5(t5_vocab), tokenizer_2=t5_tokenizer,
                        transformer=transformer)


def build_chroma(seed: int = 0):
    """A tiny ChromaPipeline (T5 only; modulation from the distilled guidance approximator)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    t5_tokenizer, t5_vocab = make_t5_tokenizer(tempfile.mkdtemp())
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                           attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_WIDTH_HEADS,
                                           joint_attention_dim=32, axes_dims_rope=TINY_ROPE_AXES,
                                           approximator_num_channels=16, approximator_hidden_dim=32,
                                           approximator_layers=2)
    return ChromaPipeline(scheduler=_scheduler("chroma"), vae=flux_vae(), text_encoder=_t5(t5_vocab),
                          tokenizer=t5_tokenizer, transformer=transformer)


def build(variant: str, seed: int = 0):
    return build_flux(seed, variant) if variant in FLUX_VARIANTS else build_chroma(seed)


def write_bfl_files(pipe, out_dir: str, config_dir: str | None = None) -> dict[str, str]:
    """The pipeline's weights as KS's input files: <variant>.safetensors (BFL transformer), ae.safetensors (LDM
    VAE layout, no prefix), clip_l.safetensors and t5xxl.safetensors (transformers layout), and a --model_config
    folder (diffusers layout, configs and tokenizers only). Returns their paths."""
    from safetensors.torch import save_file

    from library.ldm_convert import vae_to_ldm

    os.makedirs(out_dir, exist_ok=True)
    layout = flux_convert.layout_of_model(pipe.transformer)
    paths = {"transformer": os.path.join(out_dir, f"flux-{layout.variant}.safetensors"),
             "ae": os.path.join(out_dir, "ae.safetensors"), "t5xxl": os.path.join(out_dir, "t5xxl.safetensors")}
    bfl = flux_convert.diffusers_to_bfl(pipe.transformer.state_dict(), layout)
    save_file({k: v.contiguous() for k, v in bfl.items()}, paths["transformer"])
    ldm_vae = vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    save_file({k[len("first_stage_model."):]: v.contiguous() for k, v in ldm_vae.items()}, paths["ae"])
    t5 = pipe.text_encoder if layout.chroma else pipe.text_encoder_2
    t5_weights = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_weights, paths["t5xxl"])   # files store the tied embedding once, as shared.weight
    if not layout.chroma:
        paths["clip_l"] = os.path.join(out_dir, "clip_l.safetensors")
        save_file({k: v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}, paths["clip_l"])
    paths["model_config"] = write_model_config(pipe, config_dir or os.path.join(out_dir, "model_config"))
    return paths


def write_model_config(pipe, out_dir: str) -> str:
    """The pipeline saved without weights: configs and tokenizers (the --model_config folder)."""
    staging = tempfile.mkdtemp()
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for root, _, files in os.walk(staging):
            for name in files:
                if name.endswith((".safetensors", ".bin")):
                    continue
                rel = os.path.relpath(os.path.join(root, name), staging)
                os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
                shutil.copy(os.path.join(root, name), os.path.join(out_dir, rel))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

"""The model-family adapter protocol: what differs between SD1/SD2, SDXL and SD3.

The loop is written once against this protocol. An adapter is small: it loads models, encodes images and
captions, calls the denoiser, and names its prediction type and noise schedule. LoRA target tables live in
networks/lora.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class ModelOptions:
    """Plain values from the model flags."""
    pretrained_model_name_or_path: str
    model_config: str | None = None      # folder with a diffusers layout of configs (architecture override)
    vae: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    clip_skip: int | None = None
    max_token_length: int | None = None
    allow_pickle: bool = False
    zero_terminal_snr: bool = False
    precondition_outputs: bool = False   # sd3 only
    t5xxl_max_token_length: int = 256    # sd3 only
    clip_l: str | None = None            # sd3 only: separate text-encoder files (KS flags)
    clip_g: str | None = None
    t5xxl: str | None = None             # sd3 only: a file, or "none" to train without T5
    weight_dtype: torch.dtype = torch.float32


@dataclass
class Models:
    """Loaded modules. `denoiser` is the UNet (sd1, sdxl) or the MMDiT transformer (sd3)."""
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    alphas_cumprod: torch.Tensor | None = None   # DDPM families: the training schedule's ᾱ (before zero-terminal rescale)
    scheduler_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


class FamilyAdapter(Protocol):
    name: str            # "sd1" | "sdxl" | "sd3"
    kind: str            # "ddpm" | "flow"
    bucket_reso_steps: int

    def prediction_type(self, opts: ModelOptions) -> str:
        """'epsilon' | 'v_prediction' (ddpm) or 'flow' | 'flow_x0' (flow, x0 = precondition_outputs)."""

    def load(self, opts: ModelOptions) -> Models:
        """Load from a diffusers folder or a single-file checkpoint (shipped configs, no network)."""

    def encode_images(self, models: Models, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> scaled (and shifted) latents."""

    def tokenize(self, models: Models, captions: list[str]) -> list[torch.Tensor]:
        """One LongTensor [B, L] per tokenizer."""

    def encode_text(self, models: Models, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Conditioning tensors (e.g. {'encoder_hidden_states': ...}; sdxl/sd3 add pooled embeddings)."""

    def predict(self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Denoiser output for the batch. `batch` carries per-sample extras (sdxl size conditioning)."""

    def pipeline(self, models: Models) -> Any:
        """A diffusers pipeline over the same modules, for sample images."""

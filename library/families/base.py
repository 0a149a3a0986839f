"""The model-family adapter protocol: what differs between SD1/SD2, SDXL and SD3.

The loop is written once against this protocol. An adapter is small: it loads models, encodes images and
captions, calls the denoiser, and names its prediction type and noise schedule. LoRA target tables live in
networks/lora_keys.py; each family module names them in its `Family` entry (the registry the rest of the code
asks, library/families/__init__.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

import torch


@dataclass
class ModelOptions:
    """Plain values from the model flags every family has. A family's own flags live in its subclass
    (`Family.options_class`, e.g. sd1.SD1Options with --v2 / --clip_skip)."""
    pretrained_model_name_or_path: str
    model_config: str | None = None      # folder with a diffusers layout of configs (architecture override)
    vae: str | None = None
    v_parameterization: bool = False
    max_token_length: int | None = None
    allow_pickle: bool = False
    zero_terminal_snr: bool = False
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

    def pipeline_kwargs(self, models: Models) -> dict[str, Any]:
        """Extra pipeline-call arguments that keep samples faithful to training (from `models.extra`); the
        sampler passes those the pipeline accepts."""


def _no_family_flags(group: argparse._ArgumentGroup) -> None:
    """A family without model flags of its own."""


def _no_checks(opts: ModelOptions) -> None:
    """A family without flag rules of its own."""


def _no_tiny_model(out: str, seed: int = 0) -> dict:
    raise NotImplementedError("this family has no tiny-model builder")


@dataclass(frozen=True)
class Family:
    """Everything the code outside library/families/ may know about one model family: one entry per family
    module (`FAMILY = Family(...)`), listed in library/families/__init__.py. Ask it; never compare a family name.

    name, kind and bucket step come from the adapter class (one place)."""
    adapter_class: type                                  # load / encode / predict / pipeline (FamilyAdapter)
    entry_script: str                                    # the thin recipe, e.g. "train_network.py"
    prediction_types: tuple[str, ...]                    # what prediction_type(opts) may return
    options_class: type = ModelOptions                   # its own options dataclass (common + family flags)
    add_arguments: Callable[[argparse._ArgumentGroup], None] = _no_family_flags  # its flags, in the "model" group
    check: Callable[[Any], None] = _no_checks            # its flag rules, run before anything loads
    aliases: tuple[str, ...] = ()                        # other names of the same family (tools: "sd2")
    text_encoder_cache: bool = False                     # offers --cache_text_encoder_outputs[_to_disk]
    batch_keys: tuple[str, ...] = ()                     # per-sample batch extras predict() reads
    # LoRA: the denoiser targets (denoiser, include_conv) -> [LoraTarget] (networks/lora_keys.py builders),
    # "kohya" (lora_unet_* / lora_te*_ keys) or "peft" (diffusers keys) files, and which denoisers are ours.
    lora_unet_targets: Callable[[Any, bool], list] | None = None
    lora_file_format: str = "kohya"
    detects: Callable[[Any], bool] = lambda denoiser: False
    # KS's block numbering of the UNet for block_dims / *_lr_weight (networks/lora_blocks.py); None: no blocks
    lora_block_layout: Any = None
    # before loading: (detect.Checkpoint) -> detect.Detected | None, this family's folders and single files
    recognise: Callable[[Any], Any] = lambda checkpoint: None
    # metadata: ss_base_model_version from the parsed flags
    base_model_version: Callable[[argparse.Namespace], str] = lambda args: ""
    # metadata: the family's own ss_* keys (KS writes e.g. Flux's ss_guidance_scale), values as given
    extra_metadata: Callable[[argparse.Namespace], dict] = lambda args: {}
    # metadata as KS writes it: modelspec.architecture without "/lora" (KS sai_model_spec ARCH_*) and its
    # modelspec.implementation (IMPL_*)
    modelspec_architecture: Callable[[argparse.Namespace], str] = lambda args: ""
    modelspec_implementation: str = "diffusers"
    # tools: tiny model writer (tools/make_tiny_model.py) and what tools/show_timesteps.py draws with
    write_tiny_model: Callable[..., dict] = _no_tiny_model
    tiny_model_flags: tuple[str, ...] = ()               # make_tiny_model flags the writer takes (besides --out, --seed)
    default_resolution: int = 1024
    latent_channels: int = 4

    @property
    def name(self) -> str:
        return self.adapter_class.name

    @property
    def kind(self) -> str:
        return self.adapter_class.kind

    @property
    def bucket_reso_steps(self) -> int:
        return self.adapter_class.bucket_reso_steps

    def adapter(self) -> FamilyAdapter:
        return self.adapter_class()

    def options(self, args: argparse.Namespace, **overrides: Any) -> ModelOptions:
        """The options dataclass from parsed flags (fields without a flag keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(self.options_class) if hasattr(args, f.name)}
        return self.options_class(**{**values, **overrides})

    def text_encoder_cache_key(self, args: argparse.Namespace) -> str:
        """Identity of cached text-encoder outputs (a changed key re-encodes)."""
        return f"{self.name}-te-{args.max_token_length}"

"""The Chroma family entry: Flux's adapter with --model_type chroma (KS trains Chroma with flux_train_network.py
--model_type chroma, which works here too; chroma_train_network.py only changes that default). See flux.py."""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any

import torch

from library.families import flux


@dataclass
class ChromaOptions(flux.FluxOptions):
    model_type: str = "chroma"


class ChromaAdapter(flux.FluxAdapter):
    name = "chroma"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    flux.add_arguments(group)
    group.set_defaults(model_type="chroma")


def check(opts: ChromaOptions) -> None:
    if opts.model_type != "chroma":
        raise flux.UserError(f"--model_type {opts.model_type}: chroma_train_network.py trains Chroma; use "
                             "flux_train_network.py for Flux.1")
    flux.check(opts)


def is_chroma_transformer(denoiser: torch.nn.Module) -> bool:
    return type(denoiser).__name__ == "ChromaTransformer2DModel"


def recognise_checkpoint(ckpt) -> Any:
    """Chroma folders and BFL files; KS's flux_train_network.py --model_type chroma trains them too."""
    from library.families import detect
    if flux.checkpoint_is_chroma(ckpt):
        return detect.Detected(ChromaAdapter.name, "Chroma", trainers=(flux.FluxAdapter.name,),
                               hint=" (or flux_train_network.py --model_type chroma)")
    return None


FAMILY = flux.FluxFamily(
    adapter_class=ChromaAdapter, entry_script="chroma_train_network.py", prediction_types=("flow", "flow_x0"),
    options_class=ChromaOptions, add_arguments=add_arguments, check=check, text_encoder_cache=True,
    lora_unet_targets=flux.peft_targets, lora_file_format="peft", detects=is_chroma_transformer,
    recognise=recognise_checkpoint,
    base_model_version=flux.base_model_version, extra_metadata=flux.extra_metadata,
    modelspec_architecture=lambda args: "chroma", modelspec_implementation=flux.IMPL_CHROMA,
    write_tiny_model=functools.partial(flux.write_tiny_model, variant="chroma"),
    tiny_model_flags=("single_file", "model_config_out"), default_resolution=1024, latent_channels=16)

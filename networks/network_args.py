"""What the loop needs from any `--network_module` beyond KS's interface: checked network_args, weights loaded
without silent skips, atomic saves.

`validate(...)` splits KS's key=value strings and hands them to the module's own `validate_network_args`
(networks.lora: networks/lora_options.py). LyCORIS's `lycoris.kohya` is not ours, so its support module is
networks/lycoris_support.py. A third-party module without one gets its strings unchecked, as in KS, and
`--scale_weight_norms` is checked once its network exists (`check_network_supports_max_norm`).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from library.errors import UserError, closest
from library.fileio import atomic_write

# network modules that are not ours -> our support module for them (validate_network_args, load_weights,
# save_weights, prepare_network, create_network, create_network_from_weights, merge_to)
_SUPPORT_MODULES = {"lycoris.kohya": "networks.lycoris_support"}


def split_network_args(items: list[str] | None) -> dict[str, str]:
    """['conv_dim=4', 'block_dims=2,4,...'] -> {'conv_dim': '4', ...} (KS: split at the first '=')."""
    network_kwargs: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--network_args: '{item}' is not key=value; e.g. --network_args conv_dim=4")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in network_kwargs:
            raise UserError(f"--network_args: '{key}' is given twice")
        network_kwargs[key] = value.strip()
    return network_kwargs


def check_key(key: str, known, module: str, not_here: dict[str, str] | None = None, note: str = "") -> None:
    """One --network_args key of `module`: a key of another module is refused with the reason in `not_here`; an
    unknown key names the closest valid one and lists them all."""
    if not_here and key in not_here:
        raise UserError(f"--network_args: '{key}' is not an option of {module}: {not_here[key]}")
    if key not in known:
        suggestion = closest(key, known)
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        raise UserError(f"--network_args: unknown key '{key}' for {module}{note}; {hint}valid keys: "
                        f"{', '.join(known)}")


def validator_for(network_module: str) -> Callable | None:
    """The network module's validate_network_args, ours for LyCORIS, or None (unknown third-party module)."""
    return getattr(_support(network_module), "validate_network_args", None)


def _support(network_module: str):
    return importlib.import_module(_SUPPORT_MODULES.get(network_module, network_module))


def validate(network_module: str, items: list[str] | None, family: str, network_dim=None, network_alpha=None,
             network_dropout=None, scale_weight_norms: float | None = None, fp8_base: bool = False) -> dict[str, str]:
    """Check --network_args (and the rank / alpha / dropout flags) for `network_module` on `family`; returns the
    key -> string dict the module's create_network receives as **kwargs (KS passes the strings)."""
    network_kwargs = split_network_args(items)
    if scale_weight_norms is not None and not scale_weight_norms > 0:
        raise UserError(f"--scale_weight_norms: {scale_weight_norms} must be > 0 (the max Frobenius norm of each "
                        "module's update; KS suggests 1); omit it to disable")
    validator = validator_for(network_module)
    if validator is not None:
        validator(network_kwargs, family, network_dim=network_dim, network_alpha=network_alpha,
                  network_dropout=network_dropout, scale_weight_norms=scale_weight_norms, fp8_base=fp8_base)
    return network_kwargs


def check_network_supports_max_norm(network, network_module: str) -> None:
    """--scale_weight_norms needs the network's apply_max_norm_regularization (KS warns and ignores the flag;
    a flag that silently does nothing is refused here)."""
    if not hasattr(network, "apply_max_norm_regularization"):
        raise UserError(f"--scale_weight_norms: --network_module {network_module} has no "
                        "apply_max_norm_regularization; drop the flag or use networks.lora / lycoris.kohya")


def _support_function(network_module: str, name: str) -> Callable | None:
    """Our support module's replacement for a third-party network module's function, or None."""
    return getattr(_support(network_module), name, None) if network_module in _SUPPORT_MODULES else None


def create_network_from_weights(network_module: str, multiplier: float, file: str, vae, text_encoders, denoiser,
                                **kwargs):
    """The module's create_network_from_weights (--dim_from_weights, --base_weights); LyCORIS's through our support
    module, which maps the file's KS module names to this model's."""
    create = _support_function(network_module, "create_network_from_weights")
    create = create or importlib.import_module(network_module).create_network_from_weights
    return create(multiplier, file, vae, text_encoders, denoiser, **kwargs)


def create_network(network_module: str, multiplier: float, network_dim, network_alpha, vae, text_encoders, denoiser,
                   **kwargs):
    """The module's create_network; LyCORIS's through our support module, which translates its presets for
    diffusers UNets."""
    create = _support_function(network_module, "create_network")
    create = create or importlib.import_module(network_module).create_network
    return create(multiplier, network_dim, network_alpha, vae, text_encoders, denoiser, **kwargs)


def merge_network(network, network_module: str, text_encoders, denoiser, weights: dict, dtype, device) -> None:
    """--base_weights: network.merge_to(text_encoders, denoiser, weights, dtype, device) as KS calls it; LyCORIS's
    through our support module (the network's multiplier, and LoHa/LoKr merged as their forward computes)."""
    merge = _support_function(network_module, "merge_to")
    if merge is not None:
        merge(network, text_encoders, denoiser, weights, dtype, device)
    else:
        network.merge_to(text_encoders, denoiser, weights, dtype, device)


def prepare_network(network, network_module: str, denoiser, text_encoders) -> None:
    """After apply_to: the support module's checks and file names for the network (LyCORIS: KS's module names)."""
    prepare = _support_function(network_module, "prepare_network")
    if prepare is not None:
        prepare(network, denoiser, text_encoders)


def load_network_weights(network, network_module: str, file: str, denoiser):
    """--network_weights into an applied network: the support module's load_weights(network, file, denoiser)
    when it has one (LyCORIS: no silently skipped modules), else the network's own load_weights (KS)."""
    load = _support_function(network_module, "load_weights")
    return load(network, file, denoiser) if load is not None else network.load_weights(file)


def save_network_weights(network, file: str, dtype: torch.dtype | None, metadata: dict) -> None:
    """network.save_weights(file, dtype, metadata) (LyCORIS's through our support module: KS's module names),
    atomically: networks.lora writes atomically itself; any other module writes a temp file with the same
    extension (it picks the format from it), then os.replace."""
    if getattr(network, "saves_atomically", False):
        network.save_weights(file, dtype, metadata)
        return
    save = _support_function(type(network).__module__, "save_weights")
    write = (lambda f, d, m: save(network, f, d, m)) if save is not None else network.save_weights
    extension = os.path.splitext(file)[1]
    atomic_write(file, lambda tmp: write(tmp, dtype, dict(metadata)), suffix=".tmp" + extension)

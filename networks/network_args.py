"""`--network_args` for any `--network_module`, checked before any model loads.

`validate(...)` splits KS's key=value strings and hands them to the module's own `validate_network_args`
(networks.lora: networks/lora_options.py). LyCORIS's `lycoris.kohya` has none, so its checks live here in
networks/lycoris_args.py. A third-party module without one gets its strings unchecked, as in KS, and
`--scale_weight_norms` is checked once its network exists (`check_network_supports_max_norm`).
"""
from __future__ import annotations

import importlib
from typing import Callable

from library.errors import UserError

# modules we cannot add a function to: module name -> "module:function" of their validator
_EXTERNAL_VALIDATORS = {"lycoris.kohya": "networks.lycoris_args:validate_network_args"}


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


def validator_for(network_module: str) -> Callable | None:
    """The network module's validate_network_args, ours for LyCORIS, or None (unknown third-party module)."""
    if network_module in _EXTERNAL_VALIDATORS:
        module_name, function = _EXTERNAL_VALIDATORS[network_module].split(":")
        return getattr(importlib.import_module(module_name), function)
    return getattr(importlib.import_module(network_module), "validate_network_args", None)


def validate(network_module: str, items: list[str] | None, family: str, network_dim=None, network_alpha=None,
             network_dropout=None, scale_weight_norms: float | None = None) -> dict[str, str]:
    """Check --network_args (and the rank / alpha / dropout flags) for `network_module` on `family`; returns the
    key -> string dict the module's create_network receives as **kwargs (KS passes the strings)."""
    network_kwargs = split_network_args(items)
    if scale_weight_norms is not None and not scale_weight_norms > 0:
        raise UserError(f"--scale_weight_norms: {scale_weight_norms} must be > 0 (the max Frobenius norm of each "
                        "module's update; KS suggests 1); omit it to disable")
    validator = validator_for(network_module)
    if validator is not None:
        validator(network_kwargs, family, network_dim=network_dim, network_alpha=network_alpha,
                  network_dropout=network_dropout, scale_weight_norms=scale_weight_norms)
    return network_kwargs


def check_network_supports_max_norm(network, network_module: str) -> None:
    """--scale_weight_norms needs the network's apply_max_norm_regularization (KS warns and ignores the flag;
    a flag that silently does nothing is refused here)."""
    if not hasattr(network, "apply_max_norm_regularization"):
        raise UserError(f"--scale_weight_norms: --network_module {network_module} has no "
                        "apply_max_norm_regularization; drop the flag or use networks.lora / lycoris.kohya")

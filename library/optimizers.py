"""Optimizers and learning-rate schedulers by KS name.

One table resolves `--optimizer_type` (case-insensitive, as KS); `module.Class` imports any optimizer.
`--optimizer_args key=value` values are Python literals (`betas=(0.9,0.99)`, `weight_decay=0.01`).
"""
from __future__ import annotations

import ast
import importlib
import math
from typing import Any, Callable

import torch

from library.errors import UserError, closest


def _bnb(name: str) -> Callable:
    def make(params, **kw):
        import bitsandbytes as bnb
        return getattr(bnb.optim, name)(params, **kw)
    return make


def _adafactor(params, **kw):
    from transformers.optimization import Adafactor
    kw.setdefault("relative_step", False)
    kw.setdefault("scale_parameter", False)
    kw.setdefault("warmup_init", False)
    if kw.get("relative_step"):
        kw["lr"] = None
    return Adafactor(params, **kw)


def _prodigy(params, **kw):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer_type Prodigy: the package 'prodigyopt' is not installed; "
                        "pip install prodigyopt, or choose another optimizer") from None
    return Prodigy(params, **kw)


def _sgd_nesterov(params, **kw):
    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, nesterov=True, **kw)


OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda params, **kw: torch.optim.AdamW(params, **kw),
    "adamw8bit": _bnb("AdamW8bit"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit"),
    "lion": _bnb("Lion"),
    "lion8bit": _bnb("Lion8bit"),
    "sgdnesterov": _sgd_nesterov,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}
DISPLAY_NAMES = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Adafactor", "Prodigy"]


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """['weight_decay=0.01', 'betas=(0.9,0.99)'] -> {'weight_decay': 0.01, 'betas': (0.9, 0.99)}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--optimizer_args: '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # bare strings, as KS
    return out


def resolve_optimizer(optimizer_type: str) -> Callable:
    """The factory `make(params, **kwargs)` for a KS optimizer name or a `module.Class` path."""
    key = optimizer_type.lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    if "." in optimizer_type:
        module_name, cls_name = optimizer_type.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            raise UserError(f"--optimizer_type {optimizer_type}: cannot import {cls_name} from {module_name}") from None
        return lambda params, **kw: cls(params, **kw)
    hint = closest(optimizer_type, DISPLAY_NAMES)
    raise UserError(f"--optimizer_type {optimizer_type}: unknown optimizer"
                    + (f"; did you mean {hint}?" if hint else f"; choose one of {DISPLAY_NAMES} or module.Class"))


def validate_optimizer_options(optimizer_type: str, optimizer_args: list[str] | None) -> None:
    """Checks that need no model: the name resolves and the args parse."""
    make = resolve_optimizer(optimizer_type)
    kwargs = parse_optimizer_args(optimizer_args)
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        make([{"params": [probe], "lr": 1e-4}], lr=1e-4, **kwargs)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"--optimizer_args: {optimizer_type} rejects {sorted(kwargs)}: {e}") from None


def make_optimizer_factory(optimizer_type: str, learning_rate: float,
                           optimizer_args: list[str] | None) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """A function param_groups -> optimizer (the clustered optimizer calls it K times)."""
    make = resolve_optimizer(optimizer_type)
    kwargs = parse_optimizer_args(optimizer_args)
    return lambda groups: make(groups, lr=learning_rate, **kwargs)


def warmup_steps(lr_warmup_steps: float, max_train_steps: int) -> int:
    """KS: a value below 1 is a ratio of the training steps."""
    return int(lr_warmup_steps * max_train_steps) if 0 < lr_warmup_steps < 1 else int(lr_warmup_steps)


def make_lr_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int,
                      num_cycles: int = 1, power: float = 1.0):
    """diffusers' schedulers by KS name; `adafactor` keeps Adafactor's own relative-step lr."""
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule
        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                         num_cycles=num_cycles, power=power)

"""Optimizers and learning-rate schedulers by KS name (kohya sd-scripts `train_util.get_optimizer`,
`get_scheduler_fix`), through the packages KS uses: torch, bitsandbytes, prodigyopt, dadaptation, schedulefree,
transformers (Adafactor and the schedulers), diffusers (piecewise_constant).

One table resolves `--optimizer_type` (case-insensitive, as KS); an empty type is AdamW, `--use_8bit_adam` is
AdamW8bit and `--use_lion_optimizer` Lion (KS's old flags); `module.Class` imports any optimizer and a bare
unknown name is looked up in torch.optim (KS). `--optimizer_args key=value` values are Python literals
(`betas=(0.9,0.99)`), bare words stay strings.

Schedule-free optimizers keep two points of the weights: they must be in eval mode whenever the weights are read
(sampling, validation, saving) and in train mode while training (`evaluation_weights`). They replace the schedule:
the run's scheduler is then constant (KS uses a dummy one), so a non-constant `--lr_scheduler` is refused.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from library.errors import UserError, closest


def _import(package: str, pip_name: str, optimizer_type: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"--optimizer_type {optimizer_type}: the package '{pip_name}' is not installed; "
                        f"pip install -r requirements.txt, or choose another optimizer") from None


def _class(package: str, name: str, pip_name: str | None = None) -> Callable[[str], type]:
    """A lazy lookup of `package.name` (the package is imported only when the optimizer is chosen)."""
    return lambda optimizer_type: getattr(_import(package, pip_name or package.split(".")[0], optimizer_type), name)


# KS name (lower case) -> (display name, class lookup, default kwargs KS adds when not given)
OPTIMIZERS: dict[str, tuple[str, Callable[[str], type], dict[str, Any]]] = {
    "adamw": ("AdamW", lambda _: torch.optim.AdamW, {}),
    "sgdnesterov": ("SGDNesterov", lambda _: torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adamw8bit": ("AdamW8bit", _class("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"), {}),
    "sgdnesterov8bit": ("SGDNesterov8bit", _class("bitsandbytes.optim", "SGD8bit", "bitsandbytes"),
                        {"momentum": 0.9, "nesterov": True}),
    "lion": ("Lion", _class("bitsandbytes.optim", "Lion", "bitsandbytes"), {}),
    "lion8bit": ("Lion8bit", _class("bitsandbytes.optim", "Lion8bit", "bitsandbytes"), {}),
    "pagedadamw": ("PagedAdamW", _class("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"), {}),
    "pagedadamw8bit": ("PagedAdamW8bit", _class("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"), {}),
    "pagedadamw32bit": ("PagedAdamW32bit", _class("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"), {}),
    "pagedlion8bit": ("PagedLion8bit", _class("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"), {}),
    "adafactor": ("Adafactor", _class("transformers.optimization", "Adafactor", "transformers"),
                  {"relative_step": True}),
    "prodigy": ("Prodigy", _class("prodigyopt", "Prodigy"), {}),
    "dadaptation": ("DAdaptation", _class("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"), {}),
    "dadaptadampreprint": ("DAdaptAdamPreprint",
                           _class("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"), {}),
    "dadaptadagrad": ("DAdaptAdaGrad", _class("dadaptation", "DAdaptAdaGrad"), {}),
    "dadaptadam": ("DAdaptAdam", _class("dadaptation", "DAdaptAdam"), {}),
    "dadaptadan": ("DAdaptAdan", _class("dadaptation", "DAdaptAdan"), {}),
    "dadaptadanip": ("DAdaptAdanIP", _class("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"), {}),
    "dadaptlion": ("DAdaptLion", _class("dadaptation", "DAdaptLion"), {}),
    "dadaptsgd": ("DAdaptSGD", _class("dadaptation", "DAdaptSGD"), {}),
    "adamwschedulefree": ("AdamWScheduleFree", _class("schedulefree", "AdamWScheduleFree"), {}),
    "radamschedulefree": ("RAdamScheduleFree", _class("schedulefree", "RAdamScheduleFree"), {}),
    "sgdschedulefree": ("SGDScheduleFree", _class("schedulefree", "SGDScheduleFree"), {}),
}
DISPLAY_NAMES = [display for display, _, _ in OPTIMIZERS.values()]

# Optimizers that estimate the step size themselves: KS expects --learning_rate around 1.0 with them.
LR_FREE = ("prodigy", "dadapt")


def parse_optimizer_args(items: list[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """['weight_decay=0.01', 'betas=(0.9,0.99)'] -> {'weight_decay': 0.01, 'betas': (0.9, 0.99)}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag}: '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # bare strings (KS needs them quoted)
    return out


def resolve_optimizer_type(optimizer_type: str | None, use_8bit_adam: bool = False,
                           use_lion_optimizer: bool = False) -> str:
    """KS's old flags and its empty default: '' -> AdamW, --use_8bit_adam -> AdamW8bit, --use_lion_optimizer -> Lion."""
    if use_8bit_adam and use_lion_optimizer:
        raise UserError("--use_8bit_adam and --use_lion_optimizer exclude each other; give --optimizer_type instead")
    old = "AdamW8bit" if use_8bit_adam else "Lion" if use_lion_optimizer else None
    if old:
        if optimizer_type:
            raise UserError(f"--{'use_8bit_adam' if use_8bit_adam else 'use_lion_optimizer'} and --optimizer_type "
                            f"{optimizer_type} both choose the optimizer; keep only --optimizer_type")
        return old
    return optimizer_type or "AdamW"


@dataclass
class OptimizerChoice:
    """A resolved optimizer: its class and the keyword arguments it gets (KS's defaults included)."""
    name: str                      # the KS name (or module.Class) the user chose
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule_free(self) -> bool:
        return callable(getattr(self.cls, "train", None)) and callable(getattr(self.cls, "eval", None))

    @property
    def adafactor_relative_step(self) -> bool:
        return self.name.lower() == "adafactor" and bool(self.kwargs.get("relative_step"))

    def metadata_name(self) -> str:
        """`ss_optimizer` as KS writes it: `module.Class(key=value,...)`, the arguments KS passed included."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "nesterov")
        return f"{self.cls.__module__}.{self.cls.__name__}" + (f"({args})" if args else "")


def resolve_optimizer(optimizer_type: str, optimizer_args: list[str] | None = None) -> OptimizerChoice:
    """The optimizer class for a KS name, a `module.Class` path or a torch.optim class name."""
    kwargs = parse_optimizer_args(optimizer_args)
    key = optimizer_type.lower()
    if key in OPTIMIZERS:
        _, lookup, defaults = OPTIMIZERS[key]
        # KS order: the user's arguments first, then the defaults KS adds when missing (this is ss_optimizer's order)
        merged = {**kwargs, **{k: v for k, v in defaults.items() if k not in kwargs}}
        if key == "adafactor" and merged.get("warmup_init") and not merged.get("relative_step"):
            print("note: --optimizer_args warmup_init=True needs relative_step=True (KS sets it)")
            merged["relative_step"] = True
        return OptimizerChoice(optimizer_type, lookup(optimizer_type), merged)
    if "." in optimizer_type:
        module_name, cls_name = optimizer_type.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            raise UserError(f"--optimizer_type {optimizer_type}: cannot import {cls_name} from {module_name}") from None
        return OptimizerChoice(optimizer_type, cls, kwargs)
    if isinstance(getattr(torch.optim, optimizer_type, None), type):  # KS: a bare name is a torch.optim class
        return OptimizerChoice(optimizer_type, getattr(torch.optim, optimizer_type), kwargs)
    hint = closest(optimizer_type, DISPLAY_NAMES)
    raise UserError(f"--optimizer_type {optimizer_type}: unknown optimizer"
                    + (f"; did you mean {hint}?" if hint else f"; choose one of {DISPLAY_NAMES} or module.Class"))


def validate_optimizer_options(optimizer_type: str, optimizer_args: list[str] | None,
                               learning_rate: float | None = None) -> OptimizerChoice:
    """Checks that need no model: the name resolves, the class accepts the args (on a probe parameter)."""
    choice = resolve_optimizer(optimizer_type, optimizer_args)
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        _instantiate(choice, [{"params": [probe]}], learning_rate if learning_rate else 1e-4)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_args: {optimizer_type} rejects {sorted(choice.kwargs)}: {e}") from None
    if learning_rate is not None and choice.name.lower().startswith(LR_FREE) and learning_rate <= 0.1:
        print(f"note: --optimizer_type {choice.name} estimates the step size itself; KS recommends --learning_rate "
              f"around 1.0 (got {learning_rate})")
    return choice


def _instantiate(choice: OptimizerChoice, groups: list[dict], learning_rate: float) -> torch.optim.Optimizer:
    lr = None if choice.adafactor_relative_step else learning_rate
    if lr is None:  # Adafactor's relative step computes the lr itself; group lrs would override it
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
    optimizer = choice.cls(groups, lr=lr, **choice.kwargs)
    if choice.schedule_free:
        optimizer.train()  # KS: schedule-free optimizers start in train mode
    return optimizer


def make_optimizer_factory(choice: OptimizerChoice, learning_rate: float) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """A function param_groups -> optimizer (the clustered optimizer calls it K times)."""
    return lambda groups: _instantiate(choice, groups, learning_rate)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedulers
# ----------------------------------------------------------------------------------------------------------------
def int_or_float(value: str) -> int | float:
    """KS's type of --lr_warmup_steps / --lr_decay_steps: '100' -> 100 steps, '0.1' or '10%' -> a ratio 0.1."""
    value = str(value)
    if value.endswith("%"):
        try:
            return float(value[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not a valid percentage") from None
    try:
        number = float(value)
        return int(value) if number >= 1 else number
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an int, or a float below 1 (a ratio)") from None


def steps_or_ratio(value: int | float | None, num_training_steps: int) -> int:
    """KS: a float is a ratio of the training steps, an int a number of steps."""
    if value is None:
        return 0
    return int(value * num_training_steps) if isinstance(value, float) else int(value)


def warmup_steps(lr_warmup_steps: int | float, max_train_steps: int) -> int:
    return steps_or_ratio(lr_warmup_steps, max_train_steps)


# KS --lr_scheduler names: transformers' scheduler functions (KS get_scheduler_fix), diffusers' piecewise_constant,
# and adafactor (Adafactor's own relative-step lr).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")
NO_WARMUP = ("constant", "adafactor", "piecewise_constant")


@dataclass
class SchedulerOptions:
    """The scheduler flags, validated. `build` makes the scheduler once the number of steps is known."""
    name: str = "constant"
    warmup: int | float = 0               # steps, or a ratio (< 1) of the training steps
    decay: int | float = 0
    num_cycles: int = 1
    power: float = 1.0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    scheduler_type: str = ""              # --lr_scheduler_type: any scheduler class (torch.optim.lr_scheduler.X)
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    initial_lr: float | None = None       # adafactor's relative step: its initial lr

    @classmethod
    def from_args(cls, args: argparse.Namespace, choice: OptimizerChoice) -> "SchedulerOptions":
        name = args.lr_scheduler
        options = cls(name=name, warmup=args.lr_warmup_steps, decay=getattr(args, "lr_decay_steps", 0) or 0,
                      num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
                      timescale=getattr(args, "lr_scheduler_timescale", None),
                      min_lr_ratio=getattr(args, "lr_scheduler_min_lr_ratio", None),
                      scheduler_type=getattr(args, "lr_scheduler_type", "") or "",
                      scheduler_args=parse_optimizer_args(getattr(args, "lr_scheduler_args", None),
                                                          "--lr_scheduler_args"))
        for flag, value in (("lr_warmup_steps", options.warmup), ("lr_decay_steps", options.decay)):
            if value is not None and value < 0:
                raise UserError(f"--{flag}: {value} is negative; give steps (>= 1) or a ratio (0 < r < 1)")
        if choice.schedule_free:
            if options.scheduler_type or name != "constant" or options.warmup:
                raise UserError(f"--optimizer_type {choice.name} is schedule-free: it replaces --lr_scheduler, "
                                f"--lr_warmup_steps and --lr_scheduler_type; drop them (warm up with --optimizer_args "
                                f"warmup_steps=N)")
            return options
        if choice.adafactor_relative_step:
            if name != "adafactor":
                print(f"note: Adafactor with relative_step=True computes its own lr: --lr_scheduler {name} is "
                      f"replaced by adafactor (KS); pass --optimizer_args relative_step=False to use {name}")
            options.name, options.initial_lr = "adafactor", args.learning_rate
            name = "adafactor"
        elif name == "adafactor":
            raise UserError("--lr_scheduler adafactor needs --optimizer_type Adafactor with relative_step=True")
        if options.scheduler_type:
            if options.warmup:
                raise UserError("--lr_warmup_steps: a custom --lr_scheduler_type takes no warmup (KS); drop it")
            _scheduler_class(options.scheduler_type)
            return options
        if name not in SCHEDULERS:
            hint = closest(name, SCHEDULERS)
            raise UserError(f"--lr_scheduler {name}: unknown scheduler" + (f"; did you mean {hint}?" if hint else "")
                            + f"; choose one of {', '.join(SCHEDULERS)}, or --lr_scheduler_type module.Class")
        if name in NO_WARMUP and options.warmup:
            raise UserError(f"--lr_warmup_steps: --lr_scheduler {name} has no warmup (KS: '{name} does not require "
                            f"num_warmup_steps'); use constant_with_warmup, or drop --lr_warmup_steps")
        if name == "cosine_with_min_lr" and options.min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        if name == "warmup_stable_decay" and not options.decay:
            raise UserError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (steps, or a ratio < 1)")
        if name == "piecewise_constant" and "step_rules" not in options.scheduler_args:
            raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='1:100,0.1:200,0.01'")
        return options

    def build(self, optimizer, num_training_steps: int, share: int = 1):
        """`share` > 1: a scheduler that steps on 1/share of the run's steps (a per-cluster schedule)."""
        warmup = steps_or_ratio(self.warmup, num_training_steps) // share
        decay = steps_or_ratio(self.decay, num_training_steps) // share
        num_training_steps = max(1, num_training_steps // share)
        if self.scheduler_type:
            return _scheduler_class(self.scheduler_type)(optimizer, **self.scheduler_args)
        if self.name == "adafactor":
            from transformers.optimization import AdafactorSchedule
            return AdafactorSchedule(optimizer, self.initial_lr or 0.0)
        if self.name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule
            return get_piecewise_constant_schedule(optimizer, **self.scheduler_args)
        from transformers.optimization import SchedulerType, TYPE_TO_SCHEDULER_FUNCTION
        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(self.name)]
        extra = self.scheduler_args
        if self.name == "constant":
            return schedule(optimizer, **extra)
        if self.name == "constant_with_warmup":
            return schedule(optimizer, num_warmup_steps=warmup, **extra)
        if self.name == "inverse_sqrt":
            return schedule(optimizer, num_warmup_steps=warmup, timescale=self.timescale, **extra)
        if self.name == "cosine_with_restarts":
            return schedule(optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                            num_cycles=self.num_cycles, **extra)
        if self.name == "polynomial":
            return schedule(optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                            power=self.power, **extra)
        if self.name == "cosine_with_min_lr":  # KS passes half the cycles: one cycle is a half cosine here
            return schedule(optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                            num_cycles=self.num_cycles / 2, min_lr_rate=self.min_lr_ratio, **extra)
        if self.name == "warmup_stable_decay":
            return schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=num_training_steps - warmup - decay,
                            num_decay_steps=decay, num_cycles=self.num_cycles / 2,
                            min_lr_ratio=self.min_lr_ratio or 0.0, **extra)
        return schedule(optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps, **extra)


def _scheduler_class(path: str) -> type:
    """--lr_scheduler_type: `module.Class`, or a bare name from torch.optim.lr_scheduler (KS)."""
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        return getattr(module, cls_name)
    except (ImportError, AttributeError):
        raise UserError(f"--lr_scheduler_type {path}: cannot import it (give module.Class, or a name from "
                        f"torch.optim.lr_scheduler)") from None


def make_lr_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int,
                      num_cycles: int = 1, power: float = 1.0):
    """A scheduler by KS name with plain values (tests and tools); the loop uses SchedulerOptions."""
    return SchedulerOptions(name=name, warmup=num_warmup_steps, num_cycles=num_cycles, power=power).build(
        optimizer, num_training_steps)


# ----------------------------------------------------------------------------------------------------------------
# Schedule-free train/eval mode
# ----------------------------------------------------------------------------------------------------------------
def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    raw = _inner(optimizer)
    return callable(getattr(raw, "eval", None)) and callable(getattr(raw, "train", None))


@contextlib.contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """Schedule-free optimizers: the weights are their evaluation point inside (what is sampled, validated and
    saved, KS `optimizer_eval_fn`), the training point again after. Other optimizers: nothing happens."""
    if not is_schedule_free(optimizer):
        yield
        return
    raw = _inner(optimizer)
    raw.eval()
    try:
        yield
    finally:
        raw.train()

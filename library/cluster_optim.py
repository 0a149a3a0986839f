"""Timestep-clustered optimizer ("Loli", spec §6 of ../shared/spec/losses-and-timesteps.md).

``--timestep_clusters K``: K independent instances of the chosen optimizer over the SAME parameters; each
optimizer step draws a cluster k (the engine does, from a rank-independent generator) and only instance k
steps, so each noise-level slice keeps its own moment estimates. K× optimizer-state memory.

LR schedules (``--cluster_lr_schedule``):
* global (default): one scheduler over global steps, built on the ClusteredOptimizer itself. It writes the lr
  into the active instance's groups; ``set_cluster`` copies the scheduled hyperparameters (SCHEDULED_KEYS) from
  the previously active instance, so whichever cluster steps next uses the current global lr.
* per_cluster: ``ClusteredLRScheduler(make_scheduler, clustered_opt)`` builds one scheduler per instance and
  steps only the active one, so cluster k's lr follows its own step count (≈ global steps / K: build each
  scheduler with that horizon).

Both classes subclass the torch base classes only so that ``accelerator.prepare`` and torch / diffusers LR
schedulers recognise them (they check isinstance); neither calls the base constructor, all state lives in the
K instances.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

from library.errors import UserError

# Group entries an LR / momentum scheduler writes (LambdaLR & co: lr, initial_lr; OneCycleLR / CyclicLR:
# momentum or betas). Only these are shared in the global schedule: adaptive optimizers (Prodigy, D-Adaptation)
# keep per-instance estimates such as "d" in their groups, and those must stay per cluster.
SCHEDULED_KEYS = ("lr", "initial_lr", "momentum", "betas")

MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], Any]


def _materialise(param_groups: Iterable) -> list[dict]:
    """Groups as dicts with parameter LISTS: a generator would be used up by the first instance."""
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**group, "params": list(group["params"])} for group in groups]


def tensor_bytes(state: Any) -> int:
    """Bytes of every tensor inside a (nested) optimizer state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


class ClusteredOptimizer(torch.optim.Optimizer):
    """K optimizer instances over the same parameters; ``step`` steps only the active one.

    ``param_groups``, ``state`` and ``defaults`` are the active instance's (what schedulers, GradScaler and
    loggers read and write). ``optimizers`` is the list of K instances."""

    def __init__(self, make_optimizer: MakeOptimizer, param_groups: Iterable, num_clusters: int):
        if num_clusters < 1:
            raise UserError(f"--timestep_clusters: {num_clusters} clusters; use an integer >= 1 (10 is typical)")
        groups = _materialise(param_groups)
        # Each instance gets its own group dicts: torch writes defaults into them and schedulers write lr.
        self.optimizers = [make_optimizer([dict(group) for group in groups]) for _ in range(num_clusters)]
        if callable(getattr(self.optimizers[0], "train", None)):
            # Schedule-free optimizers move the parameters themselves between train and eval points; K of
            # them over the same tensors would overwrite each other's points.
            raise UserError("--timestep_clusters: schedule-free optimizers cannot be clustered (their state is the "
                            "parameters themselves); choose a regular optimizer or drop --timestep_clusters")
        self.active = 0
        self.share_hyperparameters = True  # global LR schedule; ClusteredLRScheduler turns it off
        # What torch.optim.Optimizer.__init__ would set up for step hooks (register_step_pre_hook & co).
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    @property
    def num_clusters(self) -> int:
        return len(self.optimizers)

    # --------------------------------------------------------------------------------------- routing
    def set_cluster(self, k: int) -> None:
        """Make instance k the one that steps (and whose groups the schedulers see)."""
        if not 0 <= k < self.num_clusters:
            raise ValueError(f"cluster {k} is outside [0, {self.num_clusters})")
        if self.share_hyperparameters and k != self.active:
            for source, target in zip(self.optimizers[self.active].param_groups, self.optimizers[k].param_groups):
                target.update({key: source[key] for key in SCHEDULED_KEYS if key in source})
        self.active = k

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizers[self.active].param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizers[self.active].param_groups = groups

    @property
    def state(self):
        return self.optimizers[self.active].state

    @state.setter
    def state(self, state) -> None:
        self.optimizers[self.active].state = state

    @property
    def defaults(self) -> dict:
        return self.optimizers[self.active].defaults

    def step(self, closure=None):
        optimizer = self.optimizers[self.active]
        # Some third-party optimizers take no closure argument at all.
        return optimizer.step() if closure is None else optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The parameters, hence their gradients, are shared: one instance clears them for all.
        self.optimizers[self.active].zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        group = _materialise([param_group])[0]
        for optimizer in self.optimizers:
            optimizer.add_param_group(dict(group))

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """All K instance states and the active cluster (nested plain containers: torch.save-safe, and
        accelerate's move_to_device walks them)."""
        return {"active": self.active, "clusters": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        if "clusters" not in state_dict:
            raise UserError("--timestep_clusters: the saved optimizer state is not clustered; resume without "
                            "--timestep_clusters, or start a new run")
        saved = len(state_dict["clusters"])
        if saved != self.num_clusters:
            raise UserError(f"--timestep_clusters: the saved state has {saved} cluster states and this run asks "
                            f"for {self.num_clusters}; resume with --timestep_clusters {saved}")
        for optimizer, cluster_state in zip(self.optimizers, state_dict["clusters"]):
            optimizer.load_state_dict(cluster_state)
        self.active = int(state_dict["active"])

    def memory_bytes(self) -> int:
        """Optimizer-state bytes across all K instances (≈ K × one instance once every cluster has stepped)."""
        return sum(tensor_bytes(optimizer.state) for optimizer in self.optimizers)

    # torch.optim.Optimizer pickles only defaults/state/param_groups, which here are views of one instance. Keep
    # everything but an LR scheduler's step wrapper (an instance attribute holding a weakref to THIS object: a
    # copy would step the original), as torch does by omission.
    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ClusteredOptimizer({self.num_clusters} × {self.optimizers[0]!r}, active={self.active})"


class ClusteredLRScheduler(LRScheduler):
    """``--cluster_lr_schedule per_cluster``: one scheduler per cluster instance; ``step`` advances only the
    active cluster's, so each cluster's lr follows its own step count.

    ``make_scheduler(instance)`` is called once per instance (any torch / diffusers scheduler). Building this
    turns off the global lr sharing of ``clustered_optimizer``: each cluster now owns its lr."""

    def __init__(self, make_scheduler: MakeScheduler, clustered_optimizer: ClusteredOptimizer):
        clustered_optimizer.share_hyperparameters = False
        self.optimizer = clustered_optimizer  # accelerate pairs a scheduler with its optimizer through this
        self.schedulers = [make_scheduler(optimizer) for optimizer in clustered_optimizer.optimizers]
        self.last_epoch = 0  # global scheduler steps, for logging
        self._step_count = 1  # accelerate increments it directly under gradient accumulation

    def step(self, *args, **kwargs) -> None:
        self.schedulers[self.optimizer.active].step(*args, **kwargs)
        self.last_epoch += 1
        self._step_count += 1

    def get_last_lr(self) -> list:
        return self.schedulers[self.optimizer.active].get_last_lr()

    def get_lr(self) -> list:
        return self.schedulers[self.optimizer.active].get_lr()

    def state_dict(self) -> dict:
        return {"schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
                "last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = len(state_dict["schedulers"])
        if saved != len(self.schedulers):
            raise UserError(f"--timestep_clusters: the saved state has {saved} cluster LR schedulers and this run "
                            f"asks for {len(self.schedulers)}; resume with --timestep_clusters {saved}")
        for scheduler, scheduler_state in zip(self.schedulers, state_dict["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]

"""Saving LoRA files and training-state folders, and resuming from them.

Names as KS (train_util STEP_FILE_NAME, EPOCH_FILE_NAME, LAST_STATE_NAME ...): LoRA files `{name}-step{step:08d}`,
`{name}-{epoch:06d}` and `{name}`, state folders the same plus `-state`; without --output_name the name is `at`
for step saves, `epoch` for epoch saves and `last` at the end.

State folder:
    network.safetensors        LoRA weights (fp32)
    optimizer.pt               optimizer state (all K cluster states when clustered), torch.save of tensors only
    lr_scheduler.pt            scheduler state(s)
    engine.pt                  loss-engine state (loss maps, metrics EMA), tensors and numbers only
    loss_map.safetensors       the Timestep Attention map as a tensor named `loss_map` (when one is used)
    scaler.pt                  fp16 grad-scaler state (when used)
    metrics.pt                 the always-on loss curves (normalised-loss EMA map, per-band EMAs, heatmap rows)
    train_state.json           step, epoch, position in the epoch, seed, world size
Every file is written to a temporary name and renamed, and the folder itself is assembled under a temporary name
and renamed last, so an interrupted save never leaves a torn state that `--resume` would trust.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError


@dataclass
class TrainState:
    step: int = 0              # optimizer steps completed
    epoch: int = 0             # current epoch (0-based)
    micro_in_epoch: int = 0    # micro-batches of this epoch already consumed (per rank)
    seed: int = 0
    world_size: int = 1


def step_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}"


def epoch_name(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}"


def last_name(output_name: str | None) -> str:
    return output_name or "last"


def save_state(folder: str, *, network_state: dict[str, torch.Tensor], optimizer_state: dict, scheduler_state: dict,
               engine_state: dict, train_state: TrainState, scaler_state: dict | None = None,
               loss_map: torch.Tensor | None = None, metrics_state: dict | None = None) -> None:
    """Write a complete state folder atomically (assembled as `<folder>.tmp`, then renamed)."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in network_state.items()},
              os.path.join(tmp, "network.safetensors"))
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler_state, os.path.join(tmp, "lr_scheduler.pt"))
    torch.save(engine_state, os.path.join(tmp, "engine.pt"))
    if scaler_state is not None:
        torch.save(scaler_state, os.path.join(tmp, "scaler.pt"))
    if metrics_state is not None:
        torch.save(metrics_state, os.path.join(tmp, "metrics.pt"))
    if loss_map is not None:
        save_file({"loss_map": loss_map.detach().float().cpu().contiguous()}, os.path.join(tmp, "loss_map.safetensors"))
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(asdict(train_state), f, indent=1)
    if os.path.exists(folder):
        old = folder.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def check_state_folder(folder: str) -> None:
    """Validate `--resume` before any model loads."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume: {folder} is not a folder (expected a '<name>-state' folder from --save_state)")
    for name in ("network.safetensors", "optimizer.pt", "lr_scheduler.pt", "train_state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"--resume: {folder} has no {name}; it is not a complete state folder")


def load_state(folder: str) -> dict[str, Any]:
    """Everything in a state folder, on CPU."""
    check_state_folder(folder)

    def _load(name):
        path = os.path.join(folder, name)
        return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None

    with open(os.path.join(folder, "train_state.json")) as f:
        train_state = TrainState(**json.load(f))
    return {
        "network": load_file(os.path.join(folder, "network.safetensors")),
        "optimizer": _load("optimizer.pt"),
        "lr_scheduler": _load("lr_scheduler.pt"),
        "engine": _load("engine.pt"),
        "scaler": _load("scaler.pt"),
        "train_state": train_state,
    }


def remove_old_saves(output_dir: str, output_name: str | None, keep_last_n: int | None, current: int, by: str,
                     every: int | None, what: str = "both") -> None:
    """KS `--save_last_n_steps/epochs` (LoRA files, `what="files"`) and `--save_last_n_steps_state/epochs_state`
    (state folders, `what="states"`): drop step (or epoch) saves older than the last N.

    Steps (KS get_remove_step_no): a save at step s drops the saves up to s - N - 1 rounded down to the save
    interval, so N counts steps; epochs (get_remove_epoch_no): up to e - every·N, so N counts saves."""
    if not keep_last_n:
        return
    name = step_name(output_name, 0)[:-8] if by == "step" else epoch_name(output_name, 0)[:-6]
    digits = 8 if by == "step" else 6
    suffix = {"files": r"(\.safetensors)", "states": r"(-state)", "both": r"(\.safetensors|-state)"}[what]
    pattern = re.compile(re.escape(name) + r"(\d{%d})%s$" % (digits, suffix))
    if by == "step":
        limit = current - keep_last_n - 1
        limit -= limit % (every or 1)
    else:
        limit = current - keep_last_n * (every or 1)
    for path in glob.glob(os.path.join(output_dir, f"{name}*")):
        m = pattern.match(os.path.basename(path))
        if not m:
            continue
        if int(m.group(1)) <= limit:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)

"""Saving LoRA files and training-state folders, and resuming from them.

State folder (KS names: `{output_name}-{step:08d}-state`, `{output_name}-{epoch:06d}-state`, `{output_name}-state`):
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


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-{step:08d}"


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


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


def remove_old_saves(output_dir: str, output_name: str, keep_last_n: int | None, current: int, by: str,
                     every: int | None) -> None:
    """KS `--save_last_n_steps/epochs`: drop step (or epoch) saves older than the last N.

    For steps, N counts steps (KS: a save at step s removes the one at s - N rounded to the save interval);
    for epochs, N counts saves."""
    if not keep_last_n:
        return
    digits = 8 if by == "step" else 6
    pattern = re.compile(re.escape(output_name) + r"-(\d{%d})(\.safetensors|-state)$" % digits)
    for path in glob.glob(os.path.join(output_dir, f"{output_name}-*")):
        m = pattern.match(os.path.basename(path))
        if not m:
            continue
        n = int(m.group(1))
        too_old = (n <= current - keep_last_n) if by == "step" else (n <= current - keep_last_n * (every or 1))
        if too_old:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)

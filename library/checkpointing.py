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
    manifest.json              size and SHA-256 of every file above, and the flags the state depends on (family,
                               network module / dim / alpha / args, optimizer, processes), written last
Every file is written to a temporary name and renamed, and the folder itself is assembled under a temporary name
and renamed last, so an interrupted save never leaves a torn state that `--resume` would trust.
`validate_state_folder` checks all of it (sizes, digests, that every file parses with no pickled code, that the
flags match) before any model loads.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, fields
from typing import Any

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


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lora-training-state-v1"
REQUIRED_FILES = ("network.safetensors", "optimizer.pt", "lr_scheduler.pt", "train_state.json")


def save_state(folder: str, *, network_state: dict[str, torch.Tensor], optimizer_state: dict, scheduler_state: dict,
               engine_state: dict, train_state: TrainState, scaler_state: dict | None = None,
               loss_map: torch.Tensor | None = None, metrics_state: dict | None = None,
               run_flags: dict | None = None) -> None:
    """Write a complete state folder atomically (assembled as `<folder>.tmp`, then renamed). `run_flags` (plain
    values: family, network and optimizer flags) go to the manifest, for the compatibility check on resume.
    On any failure (disk full, an interrupt) the temporary folder is removed and the previous state is kept."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
            save_file({"loss_map": loss_map.detach().float().cpu().contiguous()},
                      os.path.join(tmp, "loss_map.safetensors"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(asdict(train_state), f, indent=1)
        _write_manifest(tmp, run_flags or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, folder)


def _swap_in(tmp: str, folder: str) -> None:
    """Rename the finished `tmp` to `folder`, with Ctrl-C / SIGTERM held back for the two renames. A kill -9
    between them leaves `<folder>.old`, which fileio.remove_stale_temp_files puts back."""
    blocked = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGUSR1} if hasattr(signal, "SIGUSR1") else set())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    try:
        if os.path.exists(folder):
            old = folder.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: str, run_flags: dict) -> None:
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files, "run": run_flags}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def validate_state_folder(folder: str, expected_flags: dict | None = None) -> TrainState:
    """Everything `--resume` will read, checked before any model loads: the files exist, have the sizes and
    SHA-256 digests of the manifest, parse (safetensors headers; torch files with weights_only, memory-mapped,
    so a pickled object is refused without running it), train_state.json holds every field, and the saved
    flags equal `expected_flags` (keys present in both). One UserError naming the file and the fix."""
    where = f"--resume: {folder}"
    if not os.path.isdir(folder):
        if os.path.isdir(folder.rstrip("/") + ".old"):
            raise UserError(f"{where} is missing but {folder.rstrip('/')}.old holds the state before an interrupted "
                            f"save; rename it to {os.path.basename(folder.rstrip('/'))} and resume again")
        raise UserError(f"{where} is not a folder (expected a '<name>-state' folder from --save_state)")
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{where} has no {name}; it is not a complete state folder (resume from another one)")
    manifest = _read_manifest(folder, where)
    if manifest is not None:
        for name, entry in manifest["files"].items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{where}: {name} is missing (the manifest lists it); resume from another state")
            size = os.path.getsize(path)
            if size != entry.get("bytes"):
                raise UserError(f"{where}: {name} has {size} bytes, the save wrote {entry.get('bytes')} (truncated "
                                "or replaced); resume from another state folder")
            if file_digest(path) != entry.get("sha256"):
                raise UserError(f"{where}: {name} does not match its SHA-256 in {MANIFEST} (the file changed after "
                                "the save); resume from another state folder")
    state = _read_train_state(folder, where)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            _check_safetensors(path, where)
        elif name.endswith(".pt"):
            _check_torch_file(path, where)
    if expected_flags:
        saved = dict((manifest or {}).get("run", {}))
        saved.setdefault("world_size", state.world_size)
        first = [k for k in ("world_size", "family") if k in expected_flags]
        for key, value in [(k, expected_flags[k]) for k in first + [k for k in expected_flags if k not in first]]:
            if key in saved and _normalise(saved[key]) != _normalise(value):
                if key == "world_size":
                    raise UserError(f"--resume: the state was saved with {saved[key]} process(es), this run has "
                                    f"{value}; resume with the same number of processes (each has its share of "
                                    "the epoch and its own generator), or start a new run from the LoRA file "
                                    "saved with this state (--network_weights)")
                if key == "family":
                    raise UserError(f"--resume: the state was saved by the {saved[key]} trainer, this is {value}; "
                                    "resume with the trainer that saved it")
                raise UserError(f"--resume: the state was saved with --{key} {_show(saved[key])}, this run has "
                                f"--{key} {_show(value)}; use the saved value, or start a new run without --resume")
    return state


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _read_manifest(folder: str, where: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None  # a state saved before manifests existed: the parse checks below still apply
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("unknown format")
        return manifest
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {MANIFEST} is damaged ({e}); resume from another state folder") from None


def _read_train_state(folder: str, where: str) -> TrainState:
    try:
        with open(os.path.join(folder, "train_state.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: train_state.json is not valid JSON ({e}); resume from another state folder") from None
    names = [f.name for f in fields(TrainState)]
    if not isinstance(data, dict) or sorted(data) != sorted(names) or \
            not all(isinstance(data[n], int) and not isinstance(data[n], bool) and data[n] >= 0 for n in names) or \
            data["world_size"] < 1:
        raise UserError(f"{where}: train_state.json must hold the non-negative integers {', '.join(names)}; it holds "
                        f"{json.dumps(data)[:120]}; resume from another state folder")
    return TrainState(**data)


def _check_safetensors(path: str, where: str) -> None:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(f"{where}: {os.path.basename(path)} is damaged ({str(e).splitlines()[0]}); resume from "
                        "another state folder") from None


def _check_torch_file(path: str, where: str) -> None:
    import pickle
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"{where}: {os.path.basename(path)} holds pickled objects other than tensors (code could "
                        "run if it were loaded unsafely); it was not loaded. Resume from a state folder you saved "
                        "yourself") from None
    except Exception as e:  # noqa: BLE001  a truncated zip, garbage bytes: any failure means unusable
        raise UserError(f"{where}: {os.path.basename(path)} is damaged ({str(e).splitlines()[0][:120]}); resume "
                        "from another state folder") from None


def load_state(folder: str) -> dict[str, Any]:
    """Everything in a state folder, on CPU (validate_state_folder has checked it before the models loaded)."""

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

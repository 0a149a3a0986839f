"""Checks before anything loads: where the files go, what they would replace, numbers that cannot work, the
model family, `--network_weights` and `--resume`.

Every check raises one UserError naming the flag and the fix. `check_before_load` runs them all from
`training_loop.validate`; `check_room_for_saves` runs once the network exists and its size is known.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile

import torch

from library import checkpointing
from library.checkpointing import TrainState
from library.errors import UserError
from library.fileio import free_bytes, mib, remove_stale_temp_files

MIN_FREE_BYTES = 16 * 2**20   # before the network exists: room for at least a small LoRA and its temp copy
MAX_SEED = 2**63 - 1          # the counter-based generator packs the seed as a signed 64-bit integer
OVERWRITE = "--overwrite"
DEFAULT_OUTPUT_NAMES = ("at", "epoch", "last")  # KS names of step, epoch and final saves without --output_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(OVERWRITE, action="store_true",
                        help="replace existing files of the same --output_name in --output_dir (LoRA files, state "
                             "folders) and an existing --output_config file; without it the run refuses to start")


def world_size_from_env() -> int:
    """The number of processes the launcher started (accelerate / torchrun set WORLD_SIZE), before any
    process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def check_before_load(args: argparse.Namespace, family: str) -> TrainState | None:
    """The file checks that need no model (check_numbers runs earlier, before other flags use the numbers).
    Returns the state `--resume` will continue from (validated), if any."""
    if args.output_name is not None:  # None: the KS default names (at / epoch / last), which are plain
        check_output_name(args.output_name)
    if args.network_weights:
        check_weights_file(args.network_weights, "--network_weights")
    world_size = world_size_from_env()
    resumed = None
    if args.resume:
        resumed = checkpointing.validate_state_folder(args.resume, state_flags(args, family, world_size))
    check_writable(args.output_dir, "--output_dir")
    if getattr(args, "logging_dir", None):
        check_writable(args.logging_dir, "--logging_dir")
    for name in [args.output_name] if args.output_name else DEFAULT_OUTPUT_NAMES:
        if _is_main_process():
            for path in remove_stale_temp_files(args.output_dir, name):
                print(f"note: removed {path}, left by an interrupted save")
        if not args.overwrite:
            check_existing_outputs(args.output_dir, name, resumed)
    return resumed


def state_flags(args: argparse.Namespace, family: str, world_size: int) -> dict:
    """The flags a saved state depends on: stored in its manifest, compared on --resume."""
    return {"family": family, "network_module": args.network_module, "network_dim": args.network_dim,
            "network_alpha": args.network_alpha, "network_args": list(args.network_args or []),
            "optimizer_type": args.optimizer_type, "timestep_clusters": getattr(args, "timestep_clusters", None) or 0,
            "world_size": world_size}


# ----------------------------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------------------------
def check_output_name(name: str | None) -> None:
    """A plain file name: no folder part, not empty, not hidden (files go into --output_dir only)."""
    if name is None or not name.strip():
        raise UserError("--output_name: empty; give a plain name such as 'my_lora' (it becomes my_lora.safetensors)")
    if os.path.isabs(name) or "/" in name or "\\" in name or name in (".", "..") or ".." in name.split(os.sep):
        raise UserError(f"--output_name: '{name}' contains a folder part; give a plain name and put the folder in "
                        "--output_dir")
    if name.startswith("."):
        raise UserError(f"--output_name: '{name}' starts with '.', which makes a hidden file; remove the dot")
    if "\x00" in name:
        raise UserError("--output_name: contains a NUL character; give a plain name")


def check_writable(folder: str, flag: str) -> None:
    """The folder exists (created if needed), is writable, and has some room, before anything loads."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create '{folder}' ({e.strerror}); choose a folder you can write to") from None
    if not os.path.isdir(folder):
        raise UserError(f"{flag}: '{folder}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag}: '{folder}' is not writable ({e.strerror}); fix its permissions or choose "
                        "another folder") from None
    free = free_bytes(folder)
    if free < MIN_FREE_BYTES:
        raise UserError(f"{flag}: only {mib(free)} free in '{folder}'; free some space or choose another folder")


_NUMBERED = re.compile(r"-(?:step)?(\d{6}|\d{8})(\.safetensors|-state)$")  # NAME-000004, NAME-step00000500


def check_existing_outputs(output_dir: str, output_name: str, resumed: TrainState | None) -> None:
    """Refuse to start when this run would replace files of an earlier run: the final LoRA or state, and (unless
    resuming) numbered step/epoch saves. A resumed run may rewrite the numbered saves of the run it continues:
    after a crash, a step's LoRA can exist without its state, and the resumed run writes the same weights again."""
    if not os.path.isdir(output_dir):
        return
    clashes = []
    for entry in sorted(os.listdir(output_dir)):
        if entry in (output_name + ".safetensors", output_name + "-state"):
            clashes.append(entry)
            continue
        if not entry.startswith(output_name + "-"):
            continue
        m = _NUMBERED.search(entry)
        if not m or entry[:m.start()] != output_name:
            continue
        if resumed is None:
            clashes.append(entry)
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise UserError(f"--output_name: {os.path.join(output_dir, clashes[0])}{more} already exist(s) from an "
                        f"earlier run; add {OVERWRITE} to replace them, or choose another --output_name or "
                        "--output_dir")


def check_room_for_saves(output_dir: str, network: torch.nn.Module, save_dtype: torch.dtype,
                         save_state: bool, optimizer_copies: int = 2) -> None:
    """Once the network exists: room for one LoRA save (and its state) next to the previous one."""
    numel = sum(p.numel() for p in network.parameters())
    need = numel * torch.empty((), dtype=save_dtype).element_size()
    if save_state:
        need += numel * 4 * (1 + optimizer_copies)  # fp32 weights + optimizer moments
    need = int(need * 1.1) + 2**20
    free = free_bytes(output_dir)
    if free < need:
        raise UserError(f"--output_dir: only {mib(free)} free in '{output_dir}', a save needs about {mib(need)}; "
                        "free some space or choose another --output_dir")


def output_config_path(args: argparse.Namespace) -> str:
    """Where --output_config writes (KS: the --config_file path, '.toml' added). Refuses an existing file unless
    --overwrite, and never a file the run reads."""
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    inputs = [getattr(args, flag, None) for flag in ("dataset_config", "sample_prompts", "network_weights",
                                                     "pretrained_model_name_or_path", "vae")]
    if any(p and os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path) for p in inputs):
        raise UserError(f"--output_config: {path} is also an input of this run; give --config_file a new file name")
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"--output_config: {path} already exists (--output_config writes the effective config to "
                        f"--config_file); give --config_file a new file name, or add {OVERWRITE} to replace it")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Numbers and files that cannot work
# ----------------------------------------------------------------------------------------------------------------
def _cpu_only() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def check_numbers(args: argparse.Namespace) -> None:
    for key, value in sorted(vars(args).items()):
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and math.isnan(v):
                raise UserError(f"--{key}: nan is not a number; give a finite value")
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(args, key, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and math.isinf(v):
                raise UserError(f"--{key}: {v} is not a finite learning rate")
    if args.mixed_precision == "fp16" and _cpu_only():
        raise UserError("--mixed_precision fp16: needs a GPU (this machine has none, and fp16 autocast does not "
                        "run on the CPU); use --mixed_precision bf16 or no")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers: {args.max_data_loader_n_workers} is negative; use 0 (load "
                        "in the main process) or more")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed: {args.seed} is outside 0..{MAX_SEED} (2^63-1); pick a smaller seed")
    clip_skip = getattr(args, "clip_skip", None)
    if clip_skip is not None and clip_skip < 1:
        raise UserError(f"--clip_skip: {clip_skip} must be at least 1 (1 = the last layer, 2 = the penultimate)")


def check_clip_skip(clip_skip: int | None, text_layers: int | None) -> None:
    if clip_skip is not None and text_layers and clip_skip > text_layers:
        raise UserError(f"--clip_skip: {clip_skip} is more than the text encoder's {text_layers} layers; use "
                        f"1..{text_layers} (KS recipes use 1 or 2)")


def check_weights_file(path: str, flag: str) -> None:
    """A LoRA file that will load: a complete .safetensors, or a torch file of plain tensors (weights_only)."""
    import pickle

    if not os.path.isfile(path):
        raise UserError(f"{flag}: {path} does not exist")
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                if not list(f.keys()):
                    raise UserError(f"{flag}: {path} holds no tensors; is it the right file?")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{flag}: {path} is not a readable .safetensors file ({str(e).splitlines()[0]}); "
                            "re-download or re-export it") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"{flag}: {path} is a pickle holding objects other than tensors (code could run if it were "
                        "loaded unsafely); it was not loaded. Convert it to .safetensors with a tool you trust") from None
    except Exception as e:  # noqa: BLE001  garbage, truncated zip
        raise UserError(f"{flag}: {path} is not a readable LoRA file ({str(e).splitlines()[0][:120]}); use a "
                        ".safetensors LoRA") from None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag}: {path} holds no tensors; is it a LoRA file?")

"""Stopping a run without losing it: signals, failed saves, emergency copies, the resume command.

* SIGINT (Ctrl-C), SIGTERM (docker stop, SLURM pre-emption, a spot-instance reclaim) and SIGUSR1 (SLURM
  `--signal=USR1@120`) all mean "finish this step on every rank, save the LoRA and the state, print how to
  resume". The ranks agree on the stop in the step's gradient all-reduce (training_loop.all_reduce_gradients).
* The same signal again within DUPLICATE_WINDOW seconds is ignored (a double key press; a worker started in the
  terminal's process group also gets the copy its launcher forwards). A later one stops at once without saving
  (StopNow); while a save is being written, signals only print a note, so the save completes (no lone
  `-state.tmp`). Launchers: library/launch.py forwards every signal and never kills a saving worker on a timer.
* With several processes only the main process writes; `shared_outcome` tells every rank right after a save
  whether it failed, so all stop at once with the one line.
* A save that fails (disk full, read-only, quota) becomes SaveFailed, one line; the caller then writes one
  emergency copy on another filesystem and says where.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Iterator

from library.errors import UserError
from library.fileio import free_bytes, write_error_message

DUPLICATE_WINDOW = 2.0
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
EMERGENCY_DIR_ENV = "LORA_EMERGENCY_DIR"
LAUNCH_COMMAND_ENV = "LORA_LAUNCH_COMMAND"  # set by library.launch: its command line up to the script


class StopNow(BaseException):
    """A second stop signal outside a save: leave at once, without saving."""


class SaveFailed(UserError):
    """Writing a LoRA or a state failed; the message is one line (what, why, room left)."""


class OtherRankFailed(SystemExit):
    """On the ranks that did not save: the main process's save failed, and it prints the one line. These ranks
    leave quietly with exit code 2 (a SystemExit: no traceback, no second message)."""

    def __init__(self) -> None:
        super().__init__(2)


class StopSignals:
    """Context manager: while active, stop signals set `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._saving = False
        self._previous: dict = {}

    def __getitem__(self, index: int) -> bool:
        """`stop[0]`: the one-element-list form the loop used before (code merged from older branches)."""
        return [self.requested][index]

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._saving:
            print(f"\n{name}: still saving; the files are complete in a moment", file=sys.stderr, flush=True)
            return
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, name, time.monotonic()
            print(f"\n{name}: finishing this step, then saving the LoRA and the state ({name} again to stop at "
                  "once without saving)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self._first_at < DUPLICATE_WINDOW:
            return  # the launcher's copy of the same key press
        raise StopNow(name)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Signals during a save are noted, not acted on: the save finishes."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False


@contextlib.contextmanager
def shared_outcome(world_size: int, device) -> Iterator[None]:
    """Around a save that one rank writes: every rank learns right after it whether it failed (one all-reduce of
    one number), so the others stop at once instead of waiting at their next collective for a peer that is gone.
    The failing rank re-raises its error; the others raise OtherRankFailed."""
    if world_size <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  shared first, raised below
        error = e
    flag = torch.tensor([1.0 if error is not None else 0.0], device=device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise OtherRankFailed()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers leave stop signals to their trainer process. A Ctrl-C to the process
    group reaches the workers too; with the trainer's handler inherited they would each print the stop message
    (and a second press would kill them mid-batch), while the trainer already finishes the step and saves."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def save_errors(path: str) -> Iterator[None]:
    """Turn a failed write of `path` into SaveFailed (one line). The writers are atomic, so the previous file
    under that name is intact and no temporary file is left."""
    try:
        yield
    except (UserError, KeyboardInterrupt, StopNow):
        raise
    except Exception as e:  # noqa: BLE001  OSError, SafetensorError, torch's "file write failed" RuntimeError
        raise SaveFailed(write_error_message(e, path)) from e


def emergency_folder(output_dir: str, need_bytes: int = 0) -> str | None:
    """A writable folder on another filesystem than `output_dir` with room: $LORA_EMERGENCY_DIR, the temp
    folder, the home folder (in that order); None when there is none."""
    try:
        output_dev = os.stat(output_dir).st_dev
    except OSError:
        output_dev = None
    candidates = [os.environ.get(EMERGENCY_DIR_ENV), tempfile.gettempdir(), os.path.expanduser("~")]
    for base in candidates:
        if not base or not os.path.isdir(base):
            continue
        try:
            if output_dev is not None and os.stat(base).st_dev == output_dev and base != os.environ.get(EMERGENCY_DIR_ENV):
                continue
            if free_bytes(base) < need_bytes + 2**20:
                continue
            return tempfile.mkdtemp(prefix="lora-emergency-", dir=base)
        except OSError:
            continue
    return None


def remove_folder_quietly(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def resume_command(state_folder: str, output_dir: str | None = None) -> str:
    """The command line of this run with `--resume state_folder` (and `--output_dir` replaced when given)."""
    argv = list(sys.argv[1:])
    for flag, value in (("--resume", state_folder), ("--output_dir", output_dir)):
        if value is None:
            continue
        for i, token in enumerate(argv):
            if token == flag and i + 1 < len(argv):
                del argv[i:i + 2]
                break
            if token.startswith(flag + "="):
                del argv[i]
                break
        argv += [flag, value]
    if os.environ.get(LAUNCH_COMMAND_ENV):
        launcher = shlex.split(os.environ[LAUNCH_COMMAND_ENV])
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        launcher = ["accelerate", "launch", "--num_processes", os.environ["WORLD_SIZE"]]
    else:
        launcher = ["python"]
    return shlex.join(launcher + [sys.argv[0] or "train_network.py"] + argv)

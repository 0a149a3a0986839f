"""`accelerate launch` for one machine, with a clean Ctrl-C / SIGTERM:

    python -m library.launch --multi_gpu --num_processes 2 train_network.py --pretrained_model_name_or_path ...

The flags before the script are accelerate launch's own (its parser, its config file and defaults, its
environment preparation: accelerate.commands.launch / accelerate.utils.launch).

Why not plain `accelerate launch`: with several processes it runs torch's elastic agent. On Ctrl-C or SIGTERM the
agent sends the signal on to the workers, SIGKILLs any worker still running 30 s later
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch/distributed/elastic/multiprocessing/api.py `_close`), and ends with a
SignalException traceback and exit code 1. The trainer finishes the step and saves on that signal, but a save
longer than 30 s (an SDXL state with its optimizer on a slow disk) is killed midway. SIGUSR1 is not forwarded.

Here the launcher starts the worker processes itself (each in its own session, as torch does, so a signal
reaches a worker once: from the launcher) and
* forwards the first stop signal (SIGINT, SIGTERM, SIGUSR1, SIGHUP) and waits without a time limit while the
  workers finish their step and save;
* forwards a second one (the workers then stop at once unless they are writing a save, which completes);
* SIGKILLs the workers on a third (a worker stuck in a collective whose peer died cannot react to signals);
* exits with the workers' code: 130 after a stop, with the stop and resume lines the trainer printed and no
  traceback; after a failure the first failing worker's code. The trainer ends the other ranks itself (a failed
  save is shared with every rank, interrupts.shared_outcome); ranks still running ORPHAN_GRACE seconds after the
  main process ended are stuck in a collective and are killed.

With one process (no --multi_gpu) the script simply replaces the launcher (exec), with accelerate's environment.
Several machines, DeepSpeed, FSDP, Megatron, TPU and MPI CPU runs go to `accelerate launch` unchanged.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Protocol, Sequence

from library.interrupts import LAUNCH_COMMAND_ENV

FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, n))
REPEAT_WINDOW = 2.0    # the same signal again within this many seconds counts as one (a double key press)
POLL_SECONDS = 0.1
ORPHAN_GRACE = 30.0    # after the main process failed: other ranks still running this long are stuck; killed


class Worker(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Supervisor:
    """Forwards stop signals to the workers and decides the exit code (no time limit on a stop)."""

    def __init__(self, workers: Sequence[Worker], clock=time.monotonic, say=None) -> None:
        self.workers = list(workers)
        self.stops = 0                  # stop signals counted (repeats within REPEAT_WINDOW count once)
        self.killed = False
        self.failed: tuple[int, int] | None = None   # (rank, exit code) of the first worker that failed
        self._last: tuple[int, float] | None = None
        self._main_ended_at: float | None = None
        self._clock = clock
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    def handle(self, signum: int, frame=None) -> None:
        """Signal handler of the launcher."""
        now = self._clock()
        repeat = self._last is not None and self._last[0] == signum and now - self._last[1] < REPEAT_WINDOW
        self._last = (signum, now)
        if not repeat:
            self.stops += 1
        if self.stops >= 3 and not self.killed:
            self.killed = True
            self._say(f"\n{signal.Signals(signum).name} a third time: killing the training processes (files saved "
                      "before are intact; a save being written is lost)")
            for worker in self._alive():
                worker.kill()
            return
        for worker in self._alive():
            _send(worker, signum)

    def _alive(self) -> list[Worker]:
        return [w for w in self.workers if w.poll() is None]

    def check(self) -> bool:
        """One look at the workers: note the first failure; once the main process (rank 0, the one that saves)
        has ended after a failure, other ranks still running ORPHAN_GRACE seconds later are stuck in a collective
        with a dead peer and are killed (they hold nothing unsaved). True once all have ended."""
        codes = [w.poll() for w in self.workers]
        now = self._clock()
        if self.failed is None:
            for rank, code in enumerate(codes):
                if code is not None and code != 0 and not (self.stops and self._stopped_by_signal(code)):
                    self.failed = (rank, code)
                    break
        if codes and codes[0] is not None and self._main_ended_at is None:
            self._main_ended_at = now
        alive = self._alive()
        if self.failed is not None and self._main_ended_at is not None and alive and not self.killed \
                and now - self._main_ended_at > ORPHAN_GRACE:
            self.killed = True
            self._say(f"error: {len(alive)} training process(es) still running {ORPHAN_GRACE:.0f} s after the main "
                      "one ended with an error; killed them")
            for worker in alive:
                worker.kill()
        return all(w.poll() is not None for w in self.workers)

    @staticmethod
    def _stopped_by_signal(code: int) -> bool:
        """130: the trainer stopped (and saved); -SIG: a process still loading ended by the forwarded signal."""
        return code == 130 or -code in FORWARDED

    def exit_code(self) -> int:
        if self.failed is not None:
            rank, code = self.failed
            if code < 0:
                self._say(f"error: training process {rank} was killed by {_signal_name(-code)}"
                          + (" (out of memory?)" if -code == signal.SIGKILL and not self.killed else ""))
                return 128 - code
            if code != 2:  # 2: a user error, whose one line the process printed
                self._say(f"error: training process {rank} ended with exit code {code} (its messages are above)")
            return code
        if self.stops:
            return 130
        return 0

    def wait(self) -> int:
        while not self.check():
            time.sleep(POLL_SECONDS)
        return self.exit_code()


def _send(worker: Worker, sig: int) -> None:
    try:
        worker.send_signal(sig)
    except ProcessLookupError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (kill -9, OOM killer), so a worker saves and stops
    instead of training on orphaned (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# accelerate's arguments and environments
# ----------------------------------------------------------------------------------------------------------------
def parse(argv: Sequence[str]):
    """accelerate launch's parser and defaults (config file, --num_processes, ...), validated as it validates."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(list(argv))
    args, _defaults, _ = _validate_launch_command(args)
    return args


def handled_here(args) -> bool:
    """One machine, plain data parallel over several processes (what this trainer uses)."""
    special = any(getattr(args, name, False) for name in ("use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu"))
    return bool(args.multi_gpu) and not args.cpu and not special and int(args.num_machines or 1) <= 1


def single_process(args) -> bool:
    special = any(getattr(args, name, False) for name in ("use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu"))
    return not args.multi_gpu and not special and int(args.num_processes or 1) <= 1 \
        and int(args.num_machines or 1) <= 1 and not getattr(args, "mpirun_hostfile", None)


def script_command(args) -> list[str]:
    if args.no_python:
        return [args.training_script, *args.training_script_args]
    return [sys.executable, *(["-m"] if args.module else []), args.training_script, *args.training_script_args]


def worker_environments(args, launch_command: str) -> list[dict[str, str]]:
    """accelerate's multi-process environment plus what torchrun gives each worker (rank, world, rendezvous)."""
    from accelerate.utils import check_cuda_p2p_ib_support, prepare_multi_gpu_env
    from accelerate.utils.other import get_free_port

    base = prepare_multi_gpu_env(args)  # fills args.nproc_per_node / master_port, or standalone when the port is taken
    if not check_cuda_p2p_ib_support():  # as accelerate's multi_gpu_launcher (RTX 4000 cards)
        base.setdefault("NCCL_P2P_DISABLE", "1")
        base.setdefault("NCCL_IB_DISABLE", "1")
    port = get_free_port() if getattr(args, "standalone", False) else int(args.main_process_port)
    world = int(args.num_processes)
    common = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
              "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
              "ROLE_WORLD_SIZE": str(world),
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
              LAUNCH_COMMAND_ENV: launch_command}
    return [{**common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)} for r in range(world)]


def launch_prefix(argv: Sequence[str], args) -> str:
    """`python -m library.launch <its flags>`: the command line up to the script, for the resume command."""
    flags = list(argv[:len(argv) - 1 - len(args.training_script_args)])
    return shlex.join(["python", "-m", "library.launch", *flags])


def run_workers(commands: Sequence[list[str]], envs: Sequence[dict[str, str]]) -> int:
    """Start the workers with the stop signals caught here, wait for all of them, return the exit code."""
    supervisor = Supervisor([])
    previous = {sig: signal.signal(sig, supervisor.handle) for sig in FORWARDED}
    try:
        for command, env in zip(commands, envs):
            if supervisor.stops:
                break  # stopped while starting: do not start more
            supervisor.workers.append(subprocess.Popen(command, env=env, start_new_session=True,
                                                       preexec_fn=_end_with_parent))
        return supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except ValueError as e:  # accelerate's own checks (--multi_gpu with 1 process, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if single_process(args):
        from accelerate.utils import prepare_simple_launcher_cmd_env
        command, env = prepare_simple_launcher_cmd_env(args)
        os.execvpe(command[0], command, env)  # the script in this process: signals reach it directly
    if not handled_here(args):
        from accelerate.commands.launch import launch_command
        print("note: several machines / DeepSpeed / FSDP / TPU / MPI: handing over to `accelerate launch` (a "
              "stop signal there gives the workers 30 s to save; see docs/troubleshooting.md)", file=sys.stderr)
        launch_command(args)
        return 0
    command = script_command(args)
    envs = worker_environments(args, launch_prefix(argv, args))
    return run_workers([command] * len(envs), envs)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # Ctrl-C while accelerate was still being imported: nothing started yet
        raise SystemExit(130) from None

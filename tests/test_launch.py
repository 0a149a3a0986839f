"""library.launch (issue 13 item 14): our front end for `accelerate launch` on one machine forwards stop signals
to the workers, never kills a worker that is saving on a timer (torch's elastic agent SIGKILLs after 30 s), kills
only on a third signal, and exits 130 after a stop; the workers get accelerate's environment plus their ranks and
the launcher's command for the resume line."""
import os
import signal
import sys
import threading
import time

import pytest

from library import interrupts, launch

ACCELERATE_FLAGS = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]


class FakeWorker:
    def __init__(self, pid: int) -> None:
        self.pid, self.code, self.signals = pid, None, []

    def poll(self):
        return self.code

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)
        self.code = -signal.SIGKILL


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def supervisor(n=2):
    clock, said = Clock(), []
    workers = [FakeWorker(100 + i) for i in range(n)]
    return launch.Supervisor(workers, clock=clock, say=said.append), workers, clock, said


def test_first_and_second_signals_are_forwarded_and_a_stop_has_no_time_limit():
    sup, workers, clock, said = supervisor()
    sup.handle(signal.SIGINT)
    assert [w.signals for w in workers] == [[signal.SIGINT], [signal.SIGINT]]
    clock.now = 3600.0  # an hour-long save: nobody is killed on a timer
    assert sup.check() is False and not any(signal.SIGKILL in w.signals for w in workers)
    sup.handle(signal.SIGTERM)
    assert [w.signals for w in workers] == [[signal.SIGINT, signal.SIGTERM]] * 2
    for w in workers:
        w.code = 130
    assert sup.check() is True and sup.exit_code() == 130 and said == []


def test_a_double_press_counts_once_and_the_third_signal_kills():
    sup, workers, clock, said = supervisor()
    sup.handle(signal.SIGINT)
    clock.now = 0.5
    sup.handle(signal.SIGINT)  # the same key press twice: forwarded (the workers ignore it), counted once
    assert sup.stops == 1 and not sup.killed
    clock.now = 10.0
    sup.handle(signal.SIGINT)
    assert sup.stops == 2 and not sup.killed
    clock.now = 20.0
    sup.handle(signal.SIGINT)
    assert sup.killed and all(w.signals[-1] == signal.SIGKILL for w in workers)
    assert len(said) == 1 and "third time" in said[0]


def test_exit_codes():
    sup, workers, _, said = supervisor()
    workers[0].code, workers[1].code = 0, 0
    assert sup.check() and sup.exit_code() == 0
    sup, workers, _, said = supervisor()
    workers[0].code, workers[1].code = 2, 2  # a user error: each printed its one line, the launcher adds none
    assert sup.check() and sup.exit_code() == 2 and said == []
    sup, workers, _, said = supervisor()
    workers[0].code, workers[1].code = 0, 1  # a bug in rank 1
    assert sup.check() and sup.exit_code() == 1 and "training process 1 ended with exit code 1" in said[0]
    sup, workers, _, said = supervisor()
    workers[0].code, workers[1].code = -signal.SIGKILL, -signal.SIGKILL
    assert sup.check() and sup.exit_code() == 128 + signal.SIGKILL and "killed by SIGKILL (out of memory?)" in said[0]
    sup, workers, _, said = supervisor()  # a SIGTERM while the workers were still loading (default action)
    sup.handle(signal.SIGTERM)
    workers[0].code, workers[1].code = -signal.SIGTERM, 130
    assert sup.check() and sup.exit_code() == 130 and said == []
    sup, workers, _, said = supervisor()  # a stop whose save failed on rank 0: its code, not 130
    sup.handle(signal.SIGTERM)
    workers[0].code, workers[1].code = 2, 130
    assert sup.check() and sup.exit_code() == 2


def test_ranks_left_running_after_the_main_one_failed_are_killed_after_a_grace_period():
    sup, workers, clock, said = supervisor(3)
    workers[1].code = 1  # rank 1 crashed; rank 0 is still alive (it may be writing its emergency copy)
    clock.now = 1000.0
    assert sup.check() is False and not any(w.signals for w in workers)
    workers[0].code = 1  # rank 0 ended too; rank 2 is stuck in a collective
    clock.now = 1001.0
    assert sup.check() is False and not workers[2].signals
    clock.now = 1001.0 + launch.ORPHAN_GRACE + 1
    assert sup.check() is True and workers[2].signals == [signal.SIGKILL] and "still running" in said[0]
    assert sup.exit_code() == 1


def test_accelerate_arguments_decide_who_launches():
    args = launch.parse(ACCELERATE_FLAGS + ["train_network.py", "--seed", "1"])
    assert launch.handled_here(args) and not launch.single_process(args)
    assert launch.script_command(args) == [sys.executable, "train_network.py", "--seed", "1"]
    one = launch.parse(["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "train_network.py"])
    assert launch.single_process(one) and not launch.handled_here(one)
    two_machines = launch.parse(ACCELERATE_FLAGS[:3] + ["--num_machines", "2", "--main_process_ip", "10.0.0.1",
                                                        "--mixed_precision", "no", "--dynamo_backend", "no", "x.py"])
    assert not launch.handled_here(two_machines) and not launch.single_process(two_machines)
    assert launch.main(["--multi_gpu", "--num_processes", "1", "x.py"]) == 2  # accelerate's own check, one line


def test_one_process_runs_the_script_in_the_launcher_process(monkeypatch):
    """No --multi_gpu: the launcher becomes the script (exec), with accelerate's environment; no worker, no
    forwarding, Ctrl-C reaches the trainer directly."""
    calls = []

    def execvpe(file, argv, env):
        calls.append((file, argv, env))
        raise SystemExit(0)
    monkeypatch.setattr(os, "execvpe", execvpe)
    monkeypatch.setattr(launch, "run_workers", lambda *a: pytest.fail("no workers for one process"))
    with pytest.raises(SystemExit):
        launch.main(["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16",
                     "--dynamo_backend", "no", "train_network.py", "--seed", "1"])
    (file, argv, env), = calls
    assert file == sys.executable and argv == [sys.executable, "train_network.py", "--seed", "1"]
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and launch.LAUNCH_COMMAND_ENV not in env


def test_worker_environments_and_the_resume_command(monkeypatch):
    argv = ACCELERATE_FLAGS + ["--main_process_port", "0", "train_network.py", "--seed", "1", "--resume", "/o/a"]
    args = launch.parse(argv)
    prefix = launch.launch_prefix(argv, args)
    assert prefix == "python -m library.launch " + " ".join(ACCELERATE_FLAGS) + " --main_process_port 0"
    envs = launch.worker_environments(args, prefix)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] != "0" and envs[0]["MASTER_ADDR"] == "127.0.0.1"
    assert envs[0]["ACCELERATE_MIXED_PRECISION"] == "no" and envs[0][launch.LAUNCH_COMMAND_ENV] == prefix
    for key, value in envs[1].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["train_network.py", "--seed", "1", "--resume", "/o/a"])
    assert interrupts.resume_command("/o/b") == prefix + " train_network.py --seed 1 --resume /o/b"


CHILD = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
open(sys.argv[1] + '.ready', 'w').close()
while not got:
    time.sleep(0.01)
time.sleep(0.3)  # "finishing the step and saving"
open(sys.argv[1] + '.saved', 'w').write(str(len(got)))
sys.exit(130)
"""


def test_real_workers_get_the_signal_once_and_finish(tmp_path):
    """Two real child processes: a SIGINT to the launcher reaches each once (they run in their own sessions), they
    finish their work, and the launcher returns 130."""
    marks = [str(tmp_path / f"w{i}") for i in range(2)]

    def press_ctrl_c_when_ready():
        deadline = time.time() + 20
        while time.time() < deadline and not all(os.path.exists(m + ".ready") for m in marks):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background (nohup, CI)
    threading.Thread(target=press_ctrl_c_when_ready, daemon=True).start()
    code = launch.run_workers([[sys.executable, "-c", CHILD, m] for m in marks], [dict(os.environ)] * 2)
    assert code == 130
    assert [open(m + ".saved").read() for m in marks] == ["1", "1"]
    assert signal.getsignal(signal.SIGINT) == before  # the launcher's handler is removed


@pytest.mark.parametrize("world", [1, 2])
def test_resume_command_without_our_launcher(monkeypatch, world):
    monkeypatch.delenv(launch.LAUNCH_COMMAND_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(sys, "argv", ["train_network.py", "--seed", "1"])
    expected = "python" if world == 1 else "accelerate launch --num_processes 2"
    assert interrupts.resume_command("/o/s") == f"{expected} train_network.py --seed 1 --resume /o/s"


LONG_SAVE = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
print('ready', flush=True)
while not got:
    time.sleep(0.05)
time.sleep(float(sys.argv[2]))  # a save longer than torch's 30 s shutdown timeout
open(sys.argv[1] + os.environ['RANK'], 'w').write('complete')
sys.exit(130)
"""


@pytest.mark.slow
def test_a_save_longer_than_torchs_30_s_timeout_completes(tmp_path):
    """`accelerate launch` SIGKILLs workers 30 s after a Ctrl-C (measured: its agent logs 'Unable to shutdown
    process ... via 2, forcefully exiting via 9' and a 60 s 'save' never completes); ours waits."""
    import subprocess
    script = tmp_path / "long_save.py"
    script.write_text(LONG_SAVE)
    mark = str(tmp_path / "saved-rank")
    proc = subprocess.Popen([sys.executable, "-m", "library.launch", *ACCELERATE_FLAGS, str(script), mark, "35"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready = 0
    while ready < 2:
        line = proc.stdout.readline()
        assert line, "the workers did not start"
        ready += line.strip() == "ready"
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert [open(mark + r).read() for r in "01"] == ["complete", "complete"]
    assert "Traceback" not in out

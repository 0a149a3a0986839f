"""Issue 13 #2, #4, #14: SIGTERM and SIGUSR1 act like Ctrl-C, the launcher's forwarded copy is not a second
press, a signal during a save lets the save finish, a failed save mid-run keeps the previous files and writes
one emergency copy elsewhere."""
import os
import signal

import pytest

from library import interrupts
from library.interrupts import StopNow, StopSignals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_each_stop_signal_requests_a_stop_at_the_step_boundary(sig, capsys):
    with StopSignals() as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signal_name == signal.Signals(sig).name
        os.kill(os.getpid(), sig)  # the launcher's forwarded copy, a moment later: ignored
        with stop.saving():
            os.kill(os.getpid(), signal.SIGINT)  # during a save: noted only
        assert "still saving" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_later_second_signal_stops_at_once(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(interrupts.time, "monotonic", lambda: clock[0])
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        clock[0] += interrupts.DUPLICATE_WINDOW + 0.1
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested


def test_resume_command_replaces_resume_and_output_dir(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_network.py", "--output_dir", "out", "--resume", "old", "--seed", "1"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert interrupts.resume_command("out/x-state") == \
        "python train_network.py --output_dir out --seed 1 --resume out/x-state"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert interrupts.resume_command("/e/x-state", "/e") == \
        "accelerate launch --num_processes 2 train_network.py --seed 1 --resume /e/x-state --output_dir /e"


def test_emergency_folder_prefers_the_configured_one(tmp_path, monkeypatch):
    monkeypatch.setenv(interrupts.EMERGENCY_DIR_ENV, str(tmp_path / "spare"))
    (tmp_path / "spare").mkdir()
    folder = interrupts.emergency_folder(str(tmp_path))
    assert folder.startswith(str(tmp_path / "spare")) and os.path.isdir(folder)
    monkeypatch.setattr(interrupts, "free_bytes", lambda path: 0)
    monkeypatch.setattr(interrupts.tempfile, "gettempdir", lambda: str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "none"))
    assert interrupts.emergency_folder(str(tmp_path)) is None


def test_ctrl_c_during_set_up_is_one_line_and_130(capsys):
    """Before the steps start (models loading) a Ctrl-C has nothing to save: one line, exit 130, no traceback."""
    from library import train_util

    def main(args):
        raise KeyboardInterrupt
    code = train_util.run_cli(main, "sd1", ["--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if line] == [
        "stopped by Ctrl-C outside the training steps: nothing to save now; earlier saves are intact"]

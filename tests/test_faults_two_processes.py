"""Issue 13 item 14 and the failed-save half of item 4, with two CPU processes under our launcher
(`python -m library.launch --multi_gpu --num_processes 2 ...`, library/launch.py):
* Ctrl-C to the whole process group mid-run: both ranks stop after the same step, the state is saved, the launcher
  exits 130 with no traceback and prints our resume command, and that command continues the run;
* the disk fills while rank 0 writes a periodic save: every rank stops at once with the one error line (the other
  rank does not wait at its next collective for a peer that is gone), the previous save is intact and an emergency
  copy is written elsewhere."""
import os
import shlex
import signal
import subprocess
import time

import pytest

from library import checkpointing
from tests.test_faults_runs import check_final_named_files
from tests.train_helpers import PYTHON, ROOT, base_argv, lora_tensors

pytestmark = pytest.mark.slow

LAUNCH = [PYTHON, "-m", "library.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
FULL_DISK = os.path.join(ROOT, "tests", "fixtures", "full_disk")


def env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **extra}


def test_ctrl_c_under_our_launcher_exits_130_without_a_traceback_and_resumes(sd15, dataset, tmp_path):
    out = str(tmp_path / "out")
    argv = base_argv(sd15, dataset, out, steps=100000)
    proc = subprocess.Popen(LAUNCH + [os.path.join(ROOT, "train_network.py"), *argv], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = "", time.time() + 400
    while "loss=" not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stdout.read(32)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the launcher's process group
    text = seen + proc.communicate(timeout=400)[0]
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    assert text.count("SIGINT: finishing this step") == 2, text[-3000:]  # each rank once, from the launcher
    assert "stopped without saving" not in text
    states = check_final_named_files(out)  # the LoRA loads, the state validates (sizes, digests, parses)
    assert len(states) == 1
    step, folder = next(iter(states.items()))
    assert checkpointing.validate_state_folder(folder).world_size == 2
    lora = os.path.join(out, checkpointing.step_name("lora", step) + ".safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora_tensors(lora).items() if "lora_up" in k)
    (resume_line,) = [line for line in text.splitlines() if line.startswith("resume with: ")]
    command = shlex.split(resume_line[len("resume with: "):])
    assert command[:4] == ["python", "-m", "library.launch", "--multi_gpu"] and command[-2:] == ["--resume", folder]

    # the printed command, with a finite step count and the final state kept, continues the run
    command[0] = PYTHON
    at = command.index("--max_train_steps")
    command[at + 1] = str(step + 2)
    result = subprocess.run(command + ["--save_state"], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"resumed from {folder} at step {step}" in result.stdout
    final_state = checkpointing.validate_state_folder(os.path.join(out, "lora-state"))
    assert final_state.step == step + 2 and final_state.world_size == 2
    assert lora_tensors(os.path.join(out, "lora.safetensors"))


def test_a_full_disk_on_rank_0_stops_both_ranks_with_one_line(sd15, dataset, tmp_path):
    out, spare = str(tmp_path / "out"), tmp_path / "spare"
    spare.mkdir()
    argv = base_argv(sd15, dataset, out, steps=6, save_every_n_steps=1, save_state=True)
    failing = os.path.join(out, checkpointing.step_name("lora", 2))  # rank 0's LoRA write at step 2: disk full
    result = subprocess.run(LAUNCH + [os.path.join(ROOT, "train_network.py"), *argv], cwd=ROOT, timeout=600,
                            env=env(PYTHONPATH=FULL_DISK + os.pathsep + ROOT, LORA_TEST_FULL_DISK=failing,
                                    LORA_EMERGENCY_DIR=str(spare)),
                            capture_output=True, text=True)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]  # before: rank 1 died on its next all-reduce with a gloo traceback
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "the disk is full" in errors[0], text[-3000:]
    assert "previous LoRA and state files are intact" in errors[0] and str(spare) in errors[0]
    assert set(check_final_named_files(out)) == {1}  # step 1 intact, nothing torn, no temp files
    assert not [f for f in os.listdir(out) if f.startswith(".") or f.endswith((".tmp", ".old"))]
    (emergency,) = os.listdir(spare)
    assert set(check_final_named_files(os.path.join(spare, emergency))) == {2}

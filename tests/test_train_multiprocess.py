"""Two processes on CPU (accelerate launch --multi_gpu --num_processes 2): both ranks end with identical LoRA
weights and loss maps (with the loss-map sampler and the timestep-clustered optimizer, whose states would drift
apart if the ranks disagreed on a step's cluster)."""
import os
import subprocess
import sys

import pytest

from tests.train_helpers import ROOT, base_argv, lora_tensors, make_images, save_tiny_sd15


@pytest.mark.slow
def test_two_processes_train_identical_weights(tmp_path):
    model = save_tiny_sd15(str(tmp_path / "model"))
    make_images(str(tmp_path / "data" / "2_sks photo"), 2)
    argv = base_argv(model, str(tmp_path / "data"), str(tmp_path / "out"), steps=4, timestep_sampling="loss_map",
                     timestep_clusters=2, cache_latents=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_network.py"), *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes: max difference 0" in result.stdout, result.stdout[-2000:]
    assert "2 process(es)" in result.stdout
    weights = lora_tensors(str(tmp_path / "out" / "lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_up" in k)

"""Two CPU processes under `accelerate launch` keep identical loss maps (spec §5, distributed).

This file is also the worker script: `accelerate launch ... tests/test_multiprocess_lossmap.py OUT_DIR`.
Each rank feeds different local (bins, losses), including a step where rank 1 has a smaller batch; both maps
must equal one single-process update over the rank-ordered concatenation.
"""
import pytest
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-specific samples. Bins crowd around 500 so neighbourhoods overlap across ranks and the
    order of application changes the map. Rank 1 has 2 samples instead of 4 at step 2 (a short last batch)."""
    size = 2 if (step == 2 and rank == 1) else 4
    generator = torch.Generator().manual_seed(100 * step + rank)
    bins = torch.randint(480, 521, (size,), generator=generator)
    losses = torch.rand(size, generator=generator) * (1 + rank)
    return bins, losses


def worker(out_dir: str) -> None:
    sys.path.insert(0, ROOT)
    from accelerate import Accelerator

    from library.loss_map import LossMap, gathered_update

    accelerator = Accelerator(cpu=True)
    loss_map = LossMap()
    for step in range(STEPS):
        bins, losses = local_batch(step, accelerator.process_index)
        gathered_update(loss_map, bins, losses, accelerator.gather)
    loss_map.save_file(os.path.join(out_dir, f"rank{accelerator.process_index}.safetensors"))
    with open(os.path.join(out_dir, f"world{accelerator.process_index}.txt"), "w") as f:
        f.write(str(accelerator.num_processes))
    accelerator.wait_for_everyone()
    # Tear the gloo group down explicitly: left to interpreter exit it sometimes aborts ("terminate called
    # without an active exception").
    accelerator.end_training()


@pytest.mark.slow
def test_two_ranks_keep_identical_maps(tmp_path):
    from library.loss_map import LossMap

    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", os.path.abspath(__file__), str(tmp_path)]
    completed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [(tmp_path / f"world{r}.txt").read_text() for r in range(2)] == ["2", "2"]  # really two processes

    maps = []
    for rank in range(2):
        loaded = LossMap()
        loaded.load_file(str(tmp_path / f"rank{rank}.safetensors"))
        maps.append(loaded.values)
    assert torch.equal(maps[0], maps[1])

    sequential, rank_reversed = LossMap(), LossMap()
    for step in range(STEPS):
        batches = [local_batch(step, rank) for rank in range(2)]
        sequential.update(torch.cat([b for b, _ in batches]), torch.cat([l for _, l in batches]))
        rank_reversed.update(torch.cat([b for b, _ in batches[::-1]]), torch.cat([l for _, l in batches[::-1]]))
    assert torch.equal(maps[0], sequential.values)
    assert not torch.equal(maps[0], rank_reversed.values)  # rank order matters, so the check above has teeth
    assert (maps[0] != 1).sum() > 20


if __name__ == "__main__":
    worker(sys.argv[1])

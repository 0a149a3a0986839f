"""Validation loss: fixed levels, the same number for the same weights whatever the batch size or process split,
and a training run that is identical with and without validation."""
import os

import pytest
import torch

from library.data import DatasetOptions, build_dataset_group
from library.engine import LossEngine
from library.errors import UserError
from library.families import get_adapter, get_family
from library.families.sd1 import SD1Options
from library.loss_config import LossConfig
from library.schedules import shift
from library.validation import (ValidationSet, due_at_epoch_end, due_at_step, fixed_validation_levels,
                                gather_records, text_conditioning)
from tests.train_helpers import make_images, save_tiny_sd15


def make_engine(family="sd1", prediction="epsilon", alphas_cumprod=None, **options) -> LossEngine:
    cfg = LossConfig(family=family, prediction_type=prediction, **options)
    kind = "flow" if family == "sd3" else "ddpm"
    return LossEngine(cfg, kind, prediction, alphas_cumprod, seed=1, rank=0, world_size=1, max_train_steps=10)


# ------------------------------------------------------------------------------------------------------------ levels
def test_fixed_levels_ddpm_are_stratum_centres_inside_the_range():
    assert fixed_validation_levels(make_engine(), 10).timesteps.tolist() == list(range(50, 1000, 100))
    assert fixed_validation_levels(make_engine(), 1000).timesteps.tolist() == list(range(1000))
    narrow = make_engine(min_timestep=100, max_timestep=300)
    levels = fixed_validation_levels(narrow, 4)
    assert levels.timesteps.tolist() == [125, 175, 225, 275] and torch.equal(levels.bins, levels.timesteps)
    with pytest.raises(UserError, match="--validation_timesteps"):
        fixed_validation_levels(make_engine(), 0)


def test_fixed_levels_flow_use_the_shifted_sigma():
    engine = make_engine("sd3", "flow", timestep_shift=3.0)
    levels = fixed_validation_levels(engine, 4)
    u = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    sigma = shift(u, 3.0)  # S_3(u) = 3u/(1 + 2u) at u = 1/8, 3/8, 5/8, 7/8: 3/10, 9/14, 5/6, 21/22
    assert torch.allclose(levels.sigma.double(), sigma, atol=1e-6)
    assert levels.sigma.tolist() == pytest.approx([0.3, 9 / 14, 5 / 6, 21 / 22], abs=1e-6)
    assert torch.allclose(levels.timesteps.double(), 1000 * sigma, atol=1e-3)


def test_when_to_validate_follows_ks():
    assert [s for s in range(0, 11) if due_at_step(s, 5)] == [5, 10]
    assert not any(due_at_step(s, None) for s in range(10))
    assert [e for e in range(1, 7) if due_at_epoch_end(e, 2)] == [2, 4, 6]
    assert all(due_at_epoch_end(e, None) for e in range(1, 4))


# ------------------------------------------------------------------------------------------------------------ tiny sd1
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD1.5 (root/model), 2 training and 3 validation images, and root/ds.toml marking the latter is_val."""
    root = tmp_path_factory.mktemp("validation")
    save_tiny_sd15(str(root / "model"))
    make_images(str(root / "train"), 2, seed=0)
    make_images(str(root / "val"), 3, seed=1)
    toml = root / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{root / "train"}"\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{root / "val"}"\n  is_val = true\n')
    return root


@pytest.fixture(scope="module")
def sd1(workspace):
    group = build_dataset_group(DatasetOptions(dataset_config=str(workspace / "ds.toml")))
    adapter = get_adapter("sd1")
    models = adapter.load(SD1Options(str(workspace / "model")))
    engine = make_engine(alphas_cumprod=models.alphas_cumprod)
    return group, adapter, models, engine


def make_network(models, dropout=None):
    from networks import lora

    torch.manual_seed(0)
    te, unet = models.text_encoders[0], models.denoiser
    network = lora.create_network(1.0, 4, 2, models.vae, te, unet, neuron_dropout=dropout)
    network.apply_to(te, unet, True, True)
    with torch.no_grad():  # non-zero up weights, so the LoRA changes the outputs from the start
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.05)
    return network


def test_validation_set_is_built_from_the_held_out_images(sd1):
    group, adapter, models, engine = sd1
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
    assert sorted(item.index for item in vset.items) == sorted(item.index for item in group.validation_items())
    assert vset.num_pairs == 12 and vset.batch_size == 2
    assert all(item.latents.shape == (4, 8, 8) and item.caption == "sks photo" for item in vset.items)
    again = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(vset.items, again.items))
    # the noise of a pair depends on its key only, not on the pairs it is drawn with
    assert torch.equal(vset.noise(torch.tensor([7]))[0], vset.noise(torch.tensor([3, 7, 11]))[1])
    assert not torch.equal(vset.noise(torch.tensor([7]))[0], vset.noise(torch.tensor([6]))[0])


def test_validation_loss_is_reproducible_and_independent_of_batch_size_and_process_split(sd1):
    group, adapter, models, engine = sd1
    network = make_network(models, dropout=0.5)  # only eval mode makes the dropout irrelevant
    try:
        check_reproducible(group, adapter, models, engine, network)
    finally:
        network.restore()


def check_reproducible(group, adapter, models, engine, network):
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
    condition = text_conditioning(adapter, models)
    rng_state = torch.get_rng_state()
    first = vset.compute(adapter, models, engine, condition, batch_size=1, network=network)
    assert torch.equal(rng_state, torch.get_rng_state()) and network.training
    for module in network.modules():  # the same weights without dropout: the same number (eval mode)
        if hasattr(module, "dropout"):
            module.dropout = None
    assert set(first) == {"loss/validation", "loss/validation_weighted", *[f"loss/validation/bin_{k:02d}" for k in range(4)]}
    assert first == vset.compute(adapter, models, engine, condition, batch_size=1, network=network)  # exactly
    assert first["loss/validation"] == pytest.approx(sum(first[f"loss/validation/bin_{k:02d}"] for k in range(4)) / 4)
    assert first["loss/validation_weighted"] == pytest.approx(first["loss/validation"])  # l2, no weights: MSE

    batched = vset.compute(adapter, models, engine, condition, batch_size=3, network=network)
    assert batched == pytest.approx(first, rel=1e-6)  # only fp32 summation order differs inside the UNet

    # two "processes": disjoint shares (pairs 0, 2, 4.. and 1, 3, 5..), merged in any order
    with torch.no_grad():
        shares = [vset.evaluate(adapter, models, engine, condition, rank=r, world_size=2, batch_size=1) for r in (0, 1)]
    assert set(shares[0][:, 0].tolist()).isdisjoint(shares[1][:, 0].tolist())
    assert vset.summarise(torch.cat([shares[1], shares[0]])) == first
    with pytest.raises(RuntimeError, match="exactly once"):
        vset.summarise(shares[0])

    # ...and other weights give another number (the test can fail)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.mul_(3)
    changed = vset.compute(adapter, models, engine, condition, batch_size=1, network=network)
    assert abs(changed["loss/validation"] - first["loss/validation"]) > 1e-4


class FakeAccelerator:
    """Rank 0 of a 2-process run whose other rank holds ``other``: gather concatenates in rank order."""
    num_processes, process_index, device = 2, 0, torch.device("cpu")

    def __init__(self, other):
        self.other = other

    def gather(self, tensor):
        if tensor.dtype == torch.long:  # the share sizes
            return torch.cat([tensor, torch.tensor([self.other.shape[0]])])
        padded = torch.nn.functional.pad(self.other, (0, 0, 0, tensor.shape[0] - self.other.shape[0]), value=-1.0)
        return torch.cat([tensor, padded])


def test_gather_pads_unequal_shares():
    mine = torch.tensor([[0.0, 1.0, 1.0], [2.0, 3.0, 3.0]], dtype=torch.float64)
    other = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)
    merged = gather_records(mine, FakeAccelerator(other))
    assert merged[:, 0].tolist() == [0.0, 2.0, 1.0] and merged.shape == (3, 3)
    assert gather_records(mine, None) is mine


def test_training_is_identical_with_and_without_validation(sd1):
    """A mini loop with LoRA dropout (global RNG) and the network in train mode: validating every step must not
    change a single weight (it would if compute touched the RNG or left the network in eval mode)."""
    group, adapter, models, engine = sd1
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=2)
    condition = text_conditioning(adapter, models)

    def train(validate: bool) -> tuple[dict, dict]:
        network = make_network(models, dropout=0.3)
        initial = {k: v.clone() for k, v in network.state_dict().items()}
        network.train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
        torch.manual_seed(123)
        batch = group.load_batch(group.make_batches(1)[0], 1, 0)
        latents = adapter.encode_images(models, batch["images"], generator=torch.Generator().manual_seed(0))
        try:
            for step in range(3):
                levels = engine.sample_levels(step, latents.shape[0])
                noisy, target = engine.make_inputs(latents, engine.sample_noise(latents, step), levels)
                pred = adapter.predict(models, noisy, levels.timesteps, condition(batch), batch)
                engine.loss(pred, target, levels, step).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if validate:
                    vset.compute(adapter, models, engine, condition, step=step, network=network)
                    assert network.training and all(m.training for m in network.modules())
        finally:
            network.restore()
        return initial, {k: v.clone() for k, v in network.state_dict().items()}

    (start, plain), (_, validated) = train(False), train(True)
    assert plain.keys() == validated.keys()
    assert all(torch.equal(plain[k], validated[k]) for k in plain)
    assert not all(torch.equal(plain[k], start[k]) for k in plain)  # training did move the weights


def test_no_validation_images_is_a_user_error(sd1, tmp_path):
    _, adapter, models, engine = sd1
    make_images(str(tmp_path / "1_sks photo"), 2)
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path), resolution=64, caption_extension=".txt"))
    with pytest.raises(UserError, match="--validation_split"):
        ValidationSet.build(group, adapter, models, engine, seed=0)


@pytest.mark.parametrize("family, prediction", [("sdxl", "epsilon"), ("sd3", "flow_x0")])
def test_validation_for_sdxl_and_sd3(workspace, tmp_path, family, prediction):
    """SDXL needs the per-sample size conditioning of the batch; SD3 with --precondition_outputs compares x̂0."""
    from library.tiny_models import build_sd3, build_sdxl

    (build_sdxl(0) if family == "sdxl" else build_sd3(0, with_t5=False)).save_pretrained(str(tmp_path / "model"))
    adapter = get_adapter(family)
    opts = get_family(family).options_class(str(tmp_path / "model"))
    if prediction == "flow_x0":
        opts.precondition_outputs = True
    models = adapter.load(opts)
    engine = make_engine(family, prediction, alphas_cumprod=models.alphas_cumprod, min_snr_gamma=1.0)
    group = build_dataset_group(DatasetOptions(dataset_config=str(workspace / "ds.toml")))
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=3)
    assert all("original_sizes" in item.extras for item in vset.items)
    condition = text_conditioning(adapter, models)
    logs = vset.compute(adapter, models, engine, condition)
    assert logs == vset.compute(adapter, models, engine, condition)
    assert logs["loss/validation"] > 0 and len(logs) == 5
    # min-SNR γ = 1 weights differ from 1 at the least noisy level, so the weighted objective differs from the MSE
    assert abs(logs["loss/validation_weighted"] - logs["loss/validation"]) > 1e-3


TWO_PROCESS_SCRIPT = '''
import json, sys
import torch
from accelerate import Accelerator
from library.data import DatasetOptions, build_dataset_group
from library.engine import LossEngine
from library.families import get_adapter
from library.families.sd1 import SD1Options
from library.loss_config import LossConfig
from library.validation import ValidationSet, text_conditioning

model, toml, out = sys.argv[1:4]
accelerator = Accelerator(cpu=True)
group = build_dataset_group(DatasetOptions(dataset_config=toml))
adapter = get_adapter("sd1")
models = adapter.load(SD1Options(model))
engine = LossEngine(LossConfig(), "ddpm", "epsilon", models.alphas_cumprod, seed=1, rank=accelerator.process_index,
                    world_size=accelerator.num_processes, max_train_steps=10)
vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
logs = vset.compute(adapter, models, engine, text_conditioning(adapter, models), accelerator, batch_size=1)
with open(f"{out}.{accelerator.process_index}.json", "w") as f:
    json.dump(logs, f)
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group; without it gloo may abort at exit (SIGABRT)
'''


@pytest.mark.slow
def test_two_real_processes_agree_with_one(sd1, workspace, tmp_path):
    """accelerate launch with 2 CPU processes (~10 s): both ranks log the same numbers, equal to one process
    (up to fp32 differences from the thread count inside the UNet)."""
    import json
    import subprocess
    import sys

    from tests.train_helpers import ROOT

    group, adapter, models, engine = sd1
    model, toml = str(workspace / "model"), str(workspace / "ds.toml")
    script = tmp_path / "validate.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(script), model, toml, str(tmp_path / "logs")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"logs.{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
    single = vset.compute(adapter, models, engine, text_conditioning(adapter, models), batch_size=1)
    assert rank0 == pytest.approx(single, rel=1e-6)

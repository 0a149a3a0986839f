"""Validation loss: fixed levels, the same number for the same weights whatever the batch size or process split,
and a training run that is identical with and without validation."""
import os

import pytest
import torch

from library.data import DatasetOptions, build_dataset_group
from library.engine import LossEngine
from library.errors import UserError
from library.families import get_adapter
from library.families.base import ModelOptions
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
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    model = save_tiny_sd15(str(root / "model"))
    make_images(str(root / "train"), 2, seed=0)
    make_images(str(root / "val"), 3, seed=1)
    toml = root / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{root / "train"}"\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{root / "val"}"\n  is_val = true\n')
    group = build_dataset_group(DatasetOptions(dataset_config=str(toml)))
    adapter = get_adapter("sd1")
    models = adapter.load(ModelOptions(model))
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
    network = make_network(models)
    try:
        check_reproducible(group, adapter, models, engine, network)
    finally:
        network.restore()


def check_reproducible(group, adapter, models, engine, network):
    vset = ValidationSet.build(group, adapter, models, engine, seed=5, num_levels=4)
    condition = text_conditioning(adapter, models)
    first = vset.compute(adapter, models, engine, condition, batch_size=1, network=network)
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

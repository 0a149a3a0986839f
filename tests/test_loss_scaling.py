"""fp16 loss scaling around the optimizer step (library/loss_scaling.py), on the CPU.

accelerate makes its GradScaler only for fp16 on a GPU; here a CPU `torch.amp.GradScaler` is put where accelerate
keeps it (`accelerator.scaler`, before `prepare`), so the same accelerate code paths run: `backward` scales the
loss, the prepared optimizer's `step` runs `scaler.step` + `scaler.update()`.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from library import loss_scaling
from library.learned_weighting import LearnedWeighting
from tests.train_helpers import base_argv, lora_tensors, run_inprocess

INIT_SCALE = 1024.0


def _scaled_accelerator():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    return accelerator


def _step(fused: bool, poison: bool) -> tuple[bool, torch.Tensor, torch.Tensor, object]:
    accelerator = _scaled_accelerator()
    weight = torch.nn.Parameter(torch.ones(8))
    optimizer = accelerator.prepare(torch.optim.AdamW([weight], lr=0.1, fused=fused))
    accelerator.backward((weight * torch.arange(8.0)).sum())
    assert torch.equal(weight.grad, INIT_SCALE * torch.arange(8.0))  # accelerate scaled the loss
    if poison:
        weight.grad[3] = float("inf")
    applied = loss_scaling.optimizer_step(accelerator, optimizer)
    return applied, weight.detach().clone(), torch.tensor(accelerator.scaler.get_scale()), accelerator


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_with_an_inf_gradient_is_reported_skipped_and_changes_nothing(fused):
    applied, weight, scale, accelerator = _step(fused, poison=True)
    assert applied is False
    assert torch.equal(weight, torch.ones(8))
    assert scale.item() == INIT_SCALE / 2  # GradScaler backed off
    if fused:
        # the fused kernel skips the update itself, so accelerate's own flag misses the skip: why we read the scale
        assert accelerator.optimizer_step_was_skipped is False


@pytest.mark.parametrize("fused", [False, True])
def test_a_finite_step_is_applied_with_unscaled_gradients(fused):
    applied, weight, scale, _ = _step(fused, poison=False)
    assert applied is True
    assert scale.item() == INIT_SCALE
    # AdamW's first step moves each weight by lr·sign(g) (bias-corrected m/√v = ±1), after decay lr·wd = 1e-3:
    # element 0 has g = 0 and only decays
    expected = torch.full((8,), 1 - 0.1 * 0.01) - 0.1 * (torch.arange(8.0) > 0)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)


def test_without_a_scaler_the_step_is_plain():
    from types import SimpleNamespace

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    weight.grad = torch.tensor([1.0, 2.0])
    assert loss_scaling.optimizer_step(SimpleNamespace(scaler=None), optimizer) is True
    assert torch.equal(weight.detach(), torch.tensor([0.5, 0.0]))


def test_learned_weighting_steps_on_unscaled_gradients_and_skips_inf():
    torch.manual_seed(0)
    reference, scaled = LearnedWeighting(), LearnedWeighting()
    scaled.net.load_state_dict(reference.net.state_dict())
    sigma = torch.rand(16)
    reference(sigma).square().sum().backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    scaler.scale(scaled(sigma).square().sum()).backward()
    reference.step()
    scaled.step(scaler)
    for a, b in zip(reference.net.parameters(), scaled.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.grad is None
    scaler.update()
    before = [p.detach().clone() for p in scaled.net.parameters()]
    scaler.scale(scaled(sigma).square().sum()).backward()
    next(scaled.net.parameters()).grad.view(-1)[0] = float("nan")
    scaled.step(scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.net.parameters()))


@pytest.mark.slow
def test_skipped_fp16_step_keeps_the_schedule_and_the_scaler_state_resumes(sd15, dataset, tmp_path, monkeypatch):
    """A run with a GradScaler whose first step has an inf gradient: that update and the schedule's step are
    skipped and the scale halves; the state saved after it holds the halved scale, and a run resumed from it
    continues with that scale (a fresh scaler would start again at INIT_SCALE)."""
    from library import training_loop

    make_accelerator, forward_backward = training_loop.make_accelerator, training_loop._forward_backward
    scales = []

    def scaled_accelerator(args):
        accelerator = make_accelerator(args)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        return accelerator

    def poisoned_first_step(run, batch, micro_step):
        out = forward_backward(run, batch, micro_step)
        scales.append(run.accelerator.scaler.get_scale())
        if run.state.step == 0:
            next(p for p in run.network.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(training_loop, "make_accelerator", scaled_accelerator)
    monkeypatch.setattr(training_loop, "_forward_backward", poisoned_first_step)
    out = str(tmp_path / "out")
    flags = dict(cache_latents=True, max_grad_norm=0, lr_scheduler="linear", save_every_n_steps=1, save_state=True)
    run_inprocess("sd1", base_argv(sd15, dataset, out, steps=2, **flags))
    state1 = os.path.join(out, "lora-step00000001-state")
    assert torch.load(os.path.join(state1, "optimizer.pt"))["state"] == {}  # AdamW never stepped
    assert torch.load(os.path.join(state1, "lr_scheduler.pt"))["last_epoch"] == 0  # nor did the schedule
    assert torch.load(os.path.join(state1, "scaler.pt"))["scale"] == INIT_SCALE / 2
    with open(os.path.join(state1, "train_state.json")) as f:
        assert json.load(f)["step"] == 1  # the batch was consumed: the step counter counts batches, as KS
    uninterrupted = lora_tensors(os.path.join(out, "lora.safetensors"))
    assert scales == [INIT_SCALE, INIT_SCALE / 2]
    ups = [v for k, v in uninterrupted.items() if "lora_up" in k]
    assert any(v.abs().max() > 0 for v in ups)  # step 2 trained

    scales.clear()
    resumed = str(tmp_path / "resumed")
    run_inprocess("sd1", base_argv(sd15, dataset, resumed, steps=2, resume=state1, **flags))
    assert scales == [INIT_SCALE / 2]
    final = lora_tensors(os.path.join(resumed, "lora.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)

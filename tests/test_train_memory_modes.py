"""Memory modes end to end on a tiny SD1.5 (CPU): each mode's 3-step loss against the fp32 run, the dtypes the
mode promises, and --full_bf16 resume equal to an uninterrupted run."""
import os

import pytest
import torch

from library import checkpointing
from tests.train_helpers import base_argv, lora_tensors, run_inprocess

pytestmark = pytest.mark.slow

# Largest relative difference of any of the 3 step losses from the fp32 run's (measured: bf16 modes <= 0.1 %,
# fp8 base weights 0.6 %).
MODES = {
    "bf16": (dict(mixed_precision="bf16"), 0.005),
    "full_bf16": (dict(mixed_precision="bf16", full_bf16=True), 0.005),
    "full_bf16_stochastic_rounding": (dict(mixed_precision="bf16", full_bf16=True, stochastic_rounding=True), 0.005),
    "fp8_base_full_bf16": (dict(mixed_precision="bf16", full_bf16=True, fp8_base=True), 0.015),
    "fp8_base_unet_checkpointing_offload": (dict(mixed_precision="bf16", fp8_base_unet=True, gradient_checkpointing=True,
                                                 cpu_offload_checkpointing=True), 0.015),
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; these runs change it."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _observed_run(monkeypatch, argv):
    """Run a trainer; return the step losses and, from the first step, the dtypes of the LoRA weights and grads
    and of one UNet and one text-encoder base weight."""
    from library import training_loop

    seen = {"losses": []}
    real = training_loop._forward_backward

    def observe(run, batch, micro_step):
        result = real(run, batch, micro_step)
        seen["losses"].append(result[0].loss.item())
        if "lora" not in seen:
            te_linear = next(m for m in run.models.text_encoders[0].modules() if isinstance(m, torch.nn.Linear))
            seen["lora"] = {p.dtype for p in run.network.parameters()}
            seen["grads"] = {p.grad.dtype for p in run.network.parameters() if p.grad is not None}
            seen["unet"] = run.models.denoiser.conv_in.weight.dtype
            seen["te"] = te_linear.weight.dtype
        return result

    monkeypatch.setattr(training_loop, "_forward_backward", observe)
    seen["path"] = run_inprocess("sd1", argv)
    return seen


def test_each_memory_mode_trains_near_the_fp32_run_with_the_promised_dtypes(sd15, dataset, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    reference = _observed_run(monkeypatch, base_argv(sd15, dataset, str(tmp_path / "fp32"), steps=3))
    assert reference["lora"] == {torch.float32} and reference["unet"] == torch.float32
    for name, (flags, tolerance) in MODES.items():
        AcceleratorState._reset_state(True)
        run = _observed_run(monkeypatch, base_argv(sd15, dataset, str(tmp_path / name), steps=3, **flags))
        relative = [abs(a - b) / b for a, b in zip(run["losses"], reference["losses"])]
        assert len(relative) == 3 and max(relative) <= tolerance, (name, run["losses"], reference["losses"])
        assert run["losses"] != reference["losses"], name          # bf16 autocast really ran
        full = torch.bfloat16 if flags.get("full_bf16") else torch.float32
        assert run["lora"] == {full} and run["grads"] == {full}, name
        fp8 = flags.get("fp8_base") or flags.get("fp8_base_unet")
        assert run["unet"] == (torch.float8_e4m3fn if fp8 else torch.bfloat16), name
        assert run["te"] == (torch.float8_e4m3fn if flags.get("fp8_base") else torch.bfloat16), name
        saved = lora_tensors(run["path"])
        assert all(torch.isfinite(t).all() for t in saved.values())
        assert max(t.abs().max().item() for k, t in saved.items() if "lora_up" in k) > 0   # it trained


@pytest.mark.parametrize("flags", [dict(full_bf16=True), dict(full_bf16=True, stochastic_rounding=True)],
                         ids=["full_bf16", "full_bf16_stochastic_rounding"])
def test_full_bf16_resume_equals_uninterrupted_run(sd15, dataset, tmp_path, flags):
    from accelerate.state import AcceleratorState

    common = dict(mixed_precision="bf16", save_every_n_steps=2, save_state=True, **flags)
    full = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "full"), steps=4, **common))
    state = str(tmp_path / "full" / (checkpointing.step_name("lora", 2) + "-state"))
    assert os.path.isdir(state)
    AcceleratorState._reset_state(True)
    resumed = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "resumed"), steps=4, resume=state,
                                             **common))
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


ALL_MODES = dict(mixed_precision="bf16", full_bf16=True, stochastic_rounding=True, fp8_base=True,
                 gradient_checkpointing=True, cpu_offload_checkpointing=True)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_all_memory_modes_together_train_sdxl_and_sd3(family, dataset, tmp_path, monkeypatch):
    """Every mode at once on the other families (SD3 with its T5, whose `wo` layers stay bf16): the UNet/MMDiT and
    all text encoders hold fp8 weights, the LoRA trains in bf16, the file records the modes."""
    from safetensors import safe_open

    if family == "sdxl":
        from tests.fixtures.tiny_sdxl import write_tiny_sdxl
        model = write_tiny_sdxl(str(tmp_path / "model")).diffusers_dir
    else:
        from tests.fixtures.tiny_sd3 import write_tiny_sd3
        model = write_tiny_sd3(str(tmp_path / "model")).diffusers_dir
    from library import training_loop

    seen = {}
    real = training_loop._forward_backward

    def observe(run, batch, micro_step):
        result = real(run, batch, micro_step)
        seen.setdefault("losses", []).append(result[0].loss.item())
        seen["te"] = {m.weight.dtype for te in run.models.text_encoders if te is not None
                      for m in te.modules() if isinstance(m, torch.nn.Linear)}
        seen["denoiser"] = {m.weight.dtype for m in run.models.denoiser.modules()
                            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        seen["lora"] = {p.dtype for p in run.network.parameters()}
        return result

    monkeypatch.setattr(training_loop, "_forward_backward", observe)
    path = run_inprocess(family, base_argv(model, dataset, str(tmp_path / "out"), steps=2, **ALL_MODES))
    assert len(seen["losses"]) == 2 and all(0 < loss < 10 for loss in seen["losses"])
    assert seen["denoiser"] == {torch.float8_e4m3fn} and seen["lora"] == {torch.bfloat16}
    assert torch.float8_e4m3fn in seen["te"]
    tensors = lora_tensors(path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if "lora_up" in k or "lora_B" in k]   # KS / diffusers (sd3) key names
    assert ups and max(t.abs().max().item() for t in ups) > 0
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert (md["ss_fp8_base"], md["ss_mixed_precision"], md["ss_gradient_checkpointing"]) == ("True", "bf16", "True")

"""Speed options (library/speed.py) do not change results: compiled and channels_last runs against eager."""
from __future__ import annotations

import pytest

from library.errors import UserError
from tests.train_helpers import base_argv, make_images, run_inprocess, save_tiny_sd15


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    model = save_tiny_sd15(str(root / "model"))
    make_images(str(root / "data" / "1_sks photo"), 2)
    return model, str(root / "data"), root


def _losses(setup, name, monkeypatch, **flags) -> list[float]:
    from library import training_loop

    model, data, root = setup
    losses = []
    original = training_loop._forward_backward

    def recorded(run, batch, micro_step):
        result, levels = original(run, batch, micro_step)
        losses.append(result.loss.item())
        return result, levels

    monkeypatch.setattr(training_loop, "_forward_backward", recorded)
    run_inprocess("sd1", base_argv(model, data, str(root / name), steps=5, cache_latents=True, **flags))
    monkeypatch.setattr(training_loop, "_forward_backward", original)
    return losses


def _assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


# aot_eager runs the same TorchDynamo capture and AOT autograd graphs as inductor with eager kernels, in seconds;
# inductor's C++ code generation takes 3-13 minutes cold on two cores, so it runs only when asked for
# (RUN_INDUCTOR_TESTS=1, see tests/conftest.py).
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_compiled_fp32_gives_the_eager_losses_over_5_steps(setup, monkeypatch, backend):
    # Inductor reorders reductions: the first loss agrees to ~1e-7. AdamW's early updates are ~lr*sign(g) per
    # element, so elements whose gradient is within rounding of zero move by a full lr either way: at lr 1e-3 the
    # later losses drifted by up to 6e-5 relative (measured), so 1e-5 is checked at lr 1e-5.
    eager = _losses(setup, "eager", monkeypatch, learning_rate=1e-5)
    compiled = _losses(setup, "compiled_" + backend, monkeypatch, learning_rate=1e-5, torch_compile=True,
                       dynamo_backend=backend)
    assert abs(compiled[0] - eager[0]) <= 1e-6 * abs(eager[0])
    _assert_close(compiled, eager, 1e-5)


@pytest.mark.slow
def test_channels_last_gives_the_eager_losses(setup, monkeypatch):
    eager = _losses(setup, "eager_cl", monkeypatch)
    channels_last = _losses(setup, "channels_last", monkeypatch, channels_last=True)
    _assert_close(channels_last, eager, 1e-6)


def test_unsupported_dynamo_backend_is_refused_before_loading(setup, tmp_path):
    model, data, _ = setup
    with pytest.raises(UserError, match="--dynamo_backend"):
        run_inprocess("sd1", base_argv(model, data, str(tmp_path), torch_compile=True, dynamo_backend="tvm"))


@pytest.mark.parametrize("mixed, capability, noted", [
    ("bf16", (7, 5), True),    # T4: bf16 emulated
    ("bf16", (7, 0), True),    # V100
    ("bf16", (8, 6), False),   # RTX 30xx: native bf16
    ("fp16", (7, 5), False),
    ("no", (7, 5), False),
    ("bf16", None, False),     # no CUDA device (CPU bf16 autocast is the CPU's business)
])
def test_bf16_note_only_below_compute_capability_8(mixed, capability, noted):
    from library import speed

    note = speed.bf16_note(mixed, capability, "Tesla T4")
    assert (note is not None) == noted
    if noted:
        assert "--mixed_precision fp16" in note and f"{capability[0]}.{capability[1]}" in note


def test_check_mixed_precision_reads_the_current_cuda_device(monkeypatch, capsys):
    import torch

    from library import speed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    speed.check_mixed_precision("bf16")
    assert "Tesla T4 (compute capability 7.5)" in capsys.readouterr().out
    speed.check_mixed_precision("fp16")
    assert capsys.readouterr().out == ""


def test_vae_layout_is_channels_last_on_cpu_and_encodes_the_same_latents():
    import torch

    from library import speed
    from library.tiny_models import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        nchw = vae.encode(images).latent_dist.mean
    speed.vae_layout(vae, torch.device("cpu"))
    convs = [m.weight for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(not w.is_contiguous() for w in convs if w.shape[-1] > 1)  # a 1x1 kernel is both layouts at once
    with torch.no_grad():
        nhwc = vae.encode(images).latent_dist.mean
    assert torch.allclose(nhwc, nchw, rtol=1e-5, atol=1e-6)
    speed.vae_layout(None, torch.device("cpu"))  # families without a VAE at this point


def test_vae_layout_leaves_a_cuda_vae_alone():
    import torch

    from library import speed
    from library.tiny_models import tiny_vae

    vae = tiny_vae()
    speed.vae_layout(vae, torch.device("cuda"))  # only the device type is read; nothing moves
    assert all(m.weight.is_contiguous() for m in vae.modules() if isinstance(m, torch.nn.Conv2d))


def test_latents_reach_the_unet_in_the_default_layout(setup, monkeypatch):
    """The VAE encodes in channels_last on the CPU; the latents the UNet gets (cached or encoded in the step) are
    contiguous NCHW, so the UNet does not silently switch to NHWC (slower on the CPU, bench/speed_options.py)."""
    from library import training_loop

    model, data, root = setup
    layouts = []
    for cache in (True, False):
        original = training_loop._forward_backward

        def recorded(run, batch, micro_step):
            predict = run.adapter.predict

            def spy(models, noisy, *args, **kwargs):
                layouts.append((cache, noisy.is_contiguous()))
                return predict(models, noisy, *args, **kwargs)

            monkeypatch.setattr(run.adapter, "predict", spy)
            try:
                return original(run, batch, micro_step)
            finally:
                monkeypatch.undo()

        monkeypatch.setattr(training_loop, "_forward_backward", recorded)
        run_inprocess("sd1", base_argv(model, data, str(root / f"layout_{cache}"), steps=1, cache_latents=cache))
        monkeypatch.setattr(training_loop, "_forward_backward", original)
    assert layouts == [(True, True), (False, True)]


def test_channels_last_is_the_cpu_default_for_bf16_weights_only():
    import torch

    from library import speed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.channels_last_by_default(cpu, torch.bfloat16)
    assert not speed.channels_last_by_default(cpu, torch.float32)
    assert not speed.channels_last_by_default(cpu, torch.float16)
    assert not speed.channels_last_by_default(cuda, torch.bfloat16)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_loop_puts_a_bf16_unet_in_channels_last_on_cpu(setup, monkeypatch, mixed_precision):
    import torch
    from accelerate.state import AcceleratorState

    from library import speed

    model, data, root = setup
    layouts = []
    original = speed.apply

    def recorded(models, channels_last=False, compile_backend=None):
        original(models, channels_last, compile_backend)
        convs = [m.weight for m in models.denoiser.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        layouts.append(all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs))

    monkeypatch.setattr(speed, "apply", recorded)
    AcceleratorState._reset_state(True)  # bf16: other tests of this process set up accelerate without it
    try:
        run_inprocess("sd1", base_argv(model, data, str(root / f"cl_{mixed_precision}"), steps=1, cache_latents=True,
                                       mixed_precision=mixed_precision))
    finally:
        AcceleratorState._reset_state(True)
    assert layouts == [mixed_precision == "bf16"]

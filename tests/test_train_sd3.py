"""sd3_train_network.py end to end on a tiny SD3 (with and without T5): PEFT-key LoRA files that diffusers loads
completely; min-SNR, debiased and SNR-Huber in their flow forms equal to a hand computation; flags that mean
nothing for a flow model are refused before any model loads."""
import math

import pytest
import torch

from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    from tests.fixtures.tiny_sd3 import write_tiny_sd3
    return write_tiny_sd3(str(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_images(str(root / "2_sks photo"), 2, size=(64, 64))
    return str(root)


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_lora_loads_in_diffusers_and_changes_the_image(sd3, dataset, tmp_path, with_t5):
    from diffusers import StableDiffusion3Pipeline

    model = sd3.diffusers_dir if with_t5 else sd3.diffusers_no_t5_dir
    path = run_inprocess("sd3", base_argv(model, dataset, str(tmp_path), steps=3, t5xxl_max_token_length=77,
                                          timestep_shift=3.0, timestep_sampling="logit_normal"))
    sd = lora_tensors(path)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight" in sd
    modules = {k.rsplit(".lora_", 1)[0] for k in sd}
    assert all(k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for k in modules)

    no_t5 = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, **no_t5)
    kw = dict(prompt="sks photo", num_inference_steps=2, height=64, width=64, output_type="np",
              max_sequence_length=77)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(path, adapter_name="trained")
    peft_layers = [n for model_ in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                   for n, m in model_.named_modules() if hasattr(m, "lora_A") and "trained" in getattr(m, "lora_A", {})]
    assert len(peft_layers) == len(modules)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-4


def _flow_engine(argv):
    from library import train_util
    from library.engine import LossEngine
    from library.loss_config import LossConfig

    args = train_util.parse_args("sd3", argv)
    cfg = LossConfig.from_args(args, "sd3", "flow")
    return LossEngine(cfg, "flow", "flow", None, seed=0, rank=0, world_size=1, max_train_steps=10)


@pytest.mark.parametrize("flags", [[], ["--min_snr_gamma", "5"], ["--debiased_estimation_loss"],
                                   ["--loss_type", "huber", "--huber_schedule", "snr", "--huber_c", "0.1",
                                    "--huber_scale", "2"]])
def test_flow_loss_equals_hand_computation(flags):
    """A fixed batch at fixed sigma: the engine's loss equals the spec's flow formulas computed by hand."""
    engine = _flow_engine(flags)
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    levels = engine.levels_from_u(sigmas)  # shift 1: sigma = u (clamped to [1/T, 1])
    assert torch.allclose(levels.sigma.double(), sigmas, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(5, 16, 4, 4, generator=g), torch.randn(5, 16, 4, 4, generator=g)
    noisy, target = engine.make_inputs(latents, noise, levels)
    s = sigmas.float().view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * latents + s * noise, atol=1e-6)
    assert torch.allclose(target, noise - latents, atol=1e-6)
    pred = target + 0.3 * torch.randn(target.shape, generator=g)
    result = engine.loss(pred, target, levels, step=0, noisy=noisy)

    d = (pred - target).double()
    sig = sigmas
    snr = ((1 - sig) / sig) ** 2
    if "huber" in flags:
        c = 2.0 * ((1 - 0.1) * (1 - sig) ** 2 + 0.1)  # k·((1 − c0)(1 − σ)² + c0)
        c = c.view(-1, 1, 1, 1)
        per_sample = (2 * c * ((d ** 2 + c ** 2).sqrt() - c)).mean(dim=(1, 2, 3))
    else:
        per_sample = (d ** 2).mean(dim=(1, 2, 3))
    weight = torch.ones(5, dtype=torch.float64)
    if "--min_snr_gamma" in flags:
        weight = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) * sig ** 2
    if "--debiased_estimation_loss" in flags:
        weight = sig * (1 - sig)
    torch.testing.assert_close(result.raw.double(), per_sample, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.weighted.double(), per_sample * weight, rtol=1e-5, atol=1e-7)
    assert math.isclose(result.loss.item(), (per_sample * weight).mean().item(), rel_tol=1e-5)


@pytest.mark.parametrize("flag", [["--v_parameterization"], ["--zero_terminal_snr"],
                                  ["--scale_v_pred_loss_like_noise_pred"], ["--v_pred_like_loss", "0.1"],
                                  ["--max_token_length", "150"]])
def test_sd3_refuses_flags_without_meaning(sd3, dataset, tmp_path, flag):
    from library import train_util, training_loop
    from library.errors import UserError
    from library.families import get_adapter

    args = train_util.parse_args("sd3", base_argv(sd3.diffusers_dir, dataset, str(tmp_path)) + flag)
    with pytest.raises(UserError) as e:
        training_loop.validate(args, get_adapter("sd3"))
    assert flag[0] in str(e.value)


def test_sd3_precondition_outputs_trains(sd3, dataset, tmp_path):
    path = run_inprocess("sd3", base_argv(sd3.diffusers_no_t5_dir, dataset, str(tmp_path), steps=2,
                                          precondition_outputs=True, t5xxl_max_token_length=77,
                                          weighting_scheme="logit_normal"))
    assert all(torch.isfinite(t).all() for t in lora_tensors(path).values())

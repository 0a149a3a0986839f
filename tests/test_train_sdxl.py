"""sdxl_train_network.py end to end on a tiny SDXL: SAI-layout LoRA files that diffusers loads completely, a
hand merge equal to diffusers, the loss/timestep option matrix, cached text-encoder outputs, resume."""
import os

import pytest
import torch
from safetensors import safe_open

from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess


def test_sdxl_lora_loads_in_diffusers_and_equals_a_hand_merge(sdxl, dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from networks import lora

    path = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path), steps=3))
    sd = lora_tensors(path)
    modules = {k.split(".")[0] for k in sd}
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
    assert any(m.startswith("lora_unet_middle_block_1_") for m in modules)
    assert any(m.startswith("lora_unet_output_blocks_") for m in modules)
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    assert not any("down_blocks" in m or "up_blocks" in m for m in modules)  # never mixed with diffusers names

    kw = dict(prompt="sks photo", num_inference_steps=2, height=64, width=64, output_type="np")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(path, adapter_name="trained")
    peft_layers = [n for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for n, m in model.named_modules()
                   if hasattr(m, "lora_A") and "trained" in getattr(m, "lora_A", {})]
    assert len(peft_layers) == len(modules)
    with_lora = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(with_lora - before).max() > 1e-4

    merged = StableDiffusionXLPipeline.from_pretrained(sdxl)
    network, weights = lora.create_network_from_weights(1.0, path, merged.vae, [merged.text_encoder,
                                                         merged.text_encoder_2], merged.unet)
    network.merge_to([merged.text_encoder, merged.text_encoder_2], merged.unet, weights)
    by_hand = merged(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(by_hand - with_lora).max() < 1e-4


MATRIX = {
    "huber_snr": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1),
    "min_snr_eps": dict(min_snr_gamma=5),
    "min_snr_v": dict(min_snr_gamma=5, v_parameterization=True),
    "logit_normal": dict(timestep_sampling="logit_normal", logit_mean=0.3),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_sdxl_option_matrix(sdxl, dataset, tmp_path, case):
    path = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path), steps=2, **MATRIX[case]))
    tensors = lora_tensors(path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)
    with safe_open(path, "pt") as f:
        md = f.metadata()
    expected = {"huber_snr": ("ss_loss_type", "huber"), "min_snr_eps": ("ss_min_snr_gamma", "5.0"),
                "min_snr_v": ("ss_v_parameterization", "True"), "logit_normal": ("ss_timestep_sampling", "logit_normal")}
    key, value = expected[case]
    assert md[key] == value
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("to_disk", [False, True])
def test_sdxl_cached_text_encoder_outputs(sdxl, tmp_path, monkeypatch, to_disk):
    """With --cache_text_encoder_outputs the text encoders run once per caption before training, never in a step,
    and the result equals training without the cache."""
    from library.families import sdxl as sdxl_family

    make_images(str(tmp_path / "data" / "2_sks photo"), 2)
    calls = []
    real = sdxl_family.SDXLAdapter.encode_text
    monkeypatch.setattr(sdxl_family.SDXLAdapter, "encode_text", lambda self, *a: calls.append(1) or real(self, *a))
    flags = dict(network_train_unet_only=True, cache_latents=True, train_batch_size=2)
    cached = run_inprocess("sdxl", base_argv(sdxl, str(tmp_path / "data"), str(tmp_path / "a"), steps=3,
                                             cache_text_encoder_outputs=True,
                                             cache_text_encoder_outputs_to_disk=to_disk, **flags))
    assert len(calls) == 1  # one caching pass over the (single, deterministic) caption batch
    if to_disk:
        assert any("_te_" in f for f in os.listdir(tmp_path / "data" / "2_sks photo"))
    plain = run_inprocess("sdxl", base_argv(sdxl, str(tmp_path / "data"), str(tmp_path / "b"), steps=3, **flags))
    a, b = lora_tensors(cached), lora_tensors(plain)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # batched-encoding rounding only


def test_sdxl_cached_text_encoder_outputs_refuse_random_captions(sdxl, dataset, tmp_path):
    from library.errors import UserError
    with pytest.raises(UserError, match="shuffle_caption"):
        run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path), steps=1, cache_text_encoder_outputs=True,
                                        network_train_unet_only=True, shuffle_caption=True))


def test_sdxl_resume_equals_uninterrupted_run(sdxl, dataset, tmp_path):
    common = dict(save_every_n_steps=3, save_state=True, train_batch_size=1, loss_type="huber", min_snr_gamma=5)
    full = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path / "full"), steps=6, **common))
    resumed = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path / "resumed"), steps=6,
                                              resume=str(tmp_path / "full" / "lora-step00000003-state"), **common))
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""SD1.x / SD2.x adapter and the shared loading helpers, on tiny offline models (tests/fixtures/tiny.py)."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.families import loading
from library.families.sd1 import SD1Options
from library.families.sd1 import ADAPTER, chunk_token_ids, merge_chunk_states
from library.ldm_convert import vae_to_ldm
from library.tiny_models import tiny_vae
from tests.fixtures.tiny import tiny_sd1_paths

CAPTIONS = ["a photo of a cat", "sks dog sitting in the field"]


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _encode(models, captions=CAPTIONS):
    return ADAPTER.encode_text(models, ADAPTER.tokenize(models, captions))


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd1_paths()


@pytest.fixture(scope="module")
def from_folder(sd1):
    return ADAPTER.load(SD1Options(sd1["diffusers"]))


@pytest.fixture(scope="module")
def from_file(sd1):
    return ADAPTER.load(SD1Options(sd1["single_file"], model_config=sd1["model_config"]))


# ----------------------------------------------------------------------------------------------
# Loading: folder vs single file, overrides, refusals
# ----------------------------------------------------------------------------------------------
def test_single_file_and_folder_give_identical_weights_and_predictions(from_folder, from_file):
    assert from_folder.extra["source"] == "diffusers" and from_file.extra["source"] == "single_file"
    assert _state_dicts_equal(from_folder.denoiser, from_file.denoiser)
    assert _state_dicts_equal(from_folder.vae, from_file.vae)
    assert _state_dicts_equal(from_folder.text_encoders[0], from_file.text_encoders[0])
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 900])
    pred_a = ADAPTER.predict(from_folder, noisy, t, _encode(from_folder), {})
    pred_b = ADAPTER.predict(from_file, noisy, t, _encode(from_file), {})
    assert pred_a.shape == (2, 4, 8, 8)
    assert torch.equal(pred_a, pred_b)
    # the prediction depends on the timestep and the caption (the conditioning is actually wired in)
    assert not torch.allclose(pred_a, ADAPTER.predict(from_folder, noisy, t.flip(0), _encode(from_folder), {}))
    other = _encode(from_folder, ["red car", "blue sky"])
    assert not torch.allclose(pred_a, ADAPTER.predict(from_folder, noisy, t, other, {}))


def test_single_file_without_model_config_uses_shipped_sd15_and_says_so(sd1):
    # The tiny file does not fit the real SD1.5 architecture: a UserError that points at --model_config.
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(SD1Options(sd1["single_file"]))


def test_model_config_override_is_used_and_validated(sd1, tmp_path):
    bad = tmp_path / "cfg"
    os.makedirs(bad / "unet")
    with open(os.path.join(sd1["model_config"], "unet", "config.json")) as f:
        unet_config = json.load(f)
    unet_config["layers_per_block"] = 2  # an architecture the checkpoint does not have
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        os.symlink(os.path.join(sd1["model_config"], sub), bad / sub)
    with open(bad / "unet" / "config.json", "w") as f:
        json.dump(unet_config, f)
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(SD1Options(sd1["single_file"], model_config=str(bad)))
    with pytest.raises(UserError, match="--model_config: .* is not a folder"):
        ADAPTER.load(SD1Options(sd1["single_file"], model_config=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="--model_config: only used with a single-file"):
        ADAPTER.load(SD1Options(sd1["diffusers"], model_config=sd1["model_config"]))


def test_vae_override_from_folder_and_from_ldm_single_file(sd1, tmp_path, from_folder):
    torch.manual_seed(123)
    other = tiny_vae(4)
    other.save_pretrained(tmp_path / "vae_folder")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other.state_dict(), other.config).items()},
              str(tmp_path / "vae.safetensors"))
    # a standalone LDM VAE file has no first_stage_model. prefix
    standalone = {k.removeprefix("first_stage_model."): v.contiguous()
                  for k, v in vae_to_ldm(other.state_dict(), other.config).items()}
    save_file(standalone, str(tmp_path / "vae_standalone.safetensors"))
    assert not _state_dicts_equal(other, from_folder.vae)  # the override really is a different VAE
    for vae_path, model_path, config in [
        (tmp_path / "vae_folder", sd1["diffusers"], None),
        (tmp_path / "vae.safetensors", sd1["diffusers"], None),
        (tmp_path / "vae_standalone.safetensors", sd1["single_file"], sd1["model_config"]),
    ]:
        models = ADAPTER.load(SD1Options(model_path, model_config=config, vae=str(vae_path)))
        assert _state_dicts_equal(models.vae, other), vae_path
        assert _state_dicts_equal(models.denoiser, from_folder.denoiser)


def test_pickle_refused_without_flag_and_loaded_with_it(sd1, tmp_path, from_file):
    from safetensors.torch import load_file

    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": load_file(sd1["single_file"]), "global_step": 7}, ckpt)
    with pytest.raises(UserError, match="--allow_pickle"):
        ADAPTER.load(SD1Options(ckpt, model_config=sd1["model_config"]))
    models = ADAPTER.load(SD1Options(ckpt, model_config=sd1["model_config"], allow_pickle=True))
    assert _state_dicts_equal(models.denoiser, from_file.denoiser)
    assert _state_dicts_equal(models.text_encoders[0], from_file.text_encoders[0])


def test_damaged_float_position_ids_in_old_files_are_rebuilt(sd1, tmp_path, from_file):
    from safetensors.torch import load_file

    state = load_file(sd1["single_file"])
    # A1111-era merges stored position_ids as floats such as 75.9999: casting would shift token positions
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (torch.arange(77.0) - 1e-4)[None]
    save_file(state, str(tmp_path / "old.safetensors"))
    models = ADAPTER.load(SD1Options(str(tmp_path / "old.safetensors"), model_config=sd1["model_config"]))
    position_ids = models.text_encoders[0].embeddings.position_ids
    assert position_ids.dtype == torch.long and torch.equal(position_ids[0], torch.arange(77))
    torch.testing.assert_close(_encode(models)["encoder_hidden_states"], _encode(from_file)["encoder_hidden_states"])


def test_pickle_with_arbitrary_objects_is_refused_even_with_flag(tmp_path):
    ckpt = str(tmp_path / "evil.pt")
    import argparse

    # Lightning-style hyperparameters: an object torch.load(weights_only=True) will not rebuild
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": argparse.Namespace(lr=1.0)}, ckpt)
    with pytest.raises(UserError, match="weights_only"):
        loading.load_single_file_state_dict(ckpt, allow_pickle=True)


def test_missing_path_unknown_type_and_non_diffusers_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ADAPTER.load(SD1Options(str(tmp_path / "nope.safetensors")))
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown file type"):
        loading.resolve_model_source(str(tmp_path / "weights.onnx"))
    with pytest.raises(UserError, match="not a diffusers model"):
        loading.resolve_model_source(str(tmp_path))
    with pytest.raises(UserError, match="no model given"):
        loading.resolve_model_source("")


def test_hub_id_not_cached_is_a_quick_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        ADAPTER.load(SD1Options("some-org/some-model-that-is-not-cached"))
    assert time.monotonic() - start < 2.0


def test_hub_id_in_local_cache_resolves_to_its_snapshot(monkeypatch, tmp_path):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    os.makedirs(snapshot / "unet")
    os.makedirs(cache / "models--org--tiny" / "refs")
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    kind, path = loading.resolve_model_source("org/tiny")
    assert kind == "diffusers" and os.path.samefile(path, snapshot)


def test_weight_dtype_applies_to_every_module(sd1):
    for opts in (SD1Options(sd1["diffusers"], weight_dtype=torch.bfloat16),
                 SD1Options(sd1["single_file"], model_config=sd1["model_config"], weight_dtype=torch.bfloat16)):
        models = ADAPTER.load(opts)
        for module in (models.denoiser, models.vae, models.text_encoders[0]):
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
            assert not any(p.requires_grad for p in module.parameters())  # frozen: LoRA adds the trainables


# ----------------------------------------------------------------------------------------------
# SD2 (--v2): OpenCLIP layout in the single file
# ----------------------------------------------------------------------------------------------
def test_sd2_single_file_openclip_layout_matches_folder():
    paths = tiny_sd1_paths(v2=True, v_prediction=True)
    opts = dict(v2=True, v_parameterization=True)
    a = ADAPTER.load(SD1Options(paths["diffusers"], **opts))
    b = ADAPTER.load(SD1Options(paths["single_file"], model_config=paths["model_config"], **opts))
    for ma, mb in [(a.denoiser, b.denoiser), (a.vae, b.vae), (a.text_encoders[0], b.text_encoders[0])]:
        assert _state_dicts_equal(ma, mb)
    assert torch.equal(_encode(a)["encoder_hidden_states"], _encode(b)["encoder_hidden_states"])
    with pytest.raises(UserError, match="--v2: .*add --v2"):
        ADAPTER.load(SD1Options(paths["single_file"], model_config=paths["model_config"]))
    with pytest.raises(UserError, match="--v2: .*remove --v2"):
        sd1 = tiny_sd1_paths()
        ADAPTER.load(SD1Options(sd1["single_file"], model_config=sd1["model_config"], v2=True))


# ----------------------------------------------------------------------------------------------
# Prediction type, schedule, images, pipeline
# ----------------------------------------------------------------------------------------------
def test_prediction_type_and_v_prediction_config(sd1, caplog):
    assert ADAPTER.prediction_type(SD1Options("x")) == "epsilon"
    assert ADAPTER.prediction_type(SD1Options("x", v_parameterization=True)) == "v_prediction"
    models = ADAPTER.load(SD1Options(sd1["diffusers"], v_parameterization=True))
    assert models.scheduler_config["prediction_type"] == "v_prediction"
    assert ADAPTER.pipeline(models).scheduler.config.prediction_type == "v_prediction"
    v_model = tiny_sd1_paths(v2=True, v_prediction=True)["diffusers"]
    with caplog.at_level(logging.WARNING, logger="library.families.sd1"):
        eps = ADAPTER.load(SD1Options(v_model, v2=True))  # the folder says v, the flag says ε: warn
    assert eps.scheduler_config["prediction_type"] == "epsilon"
    assert "prediction_type=v_prediction" in caplog.text


def test_alphas_cumprod_is_sd_scaled_linear(from_folder):
    from diffusers import DDPMScheduler

    ac = from_folder.alphas_cumprod
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    torch.testing.assert_close(ac, reference, rtol=1e-5, atol=1e-7)
    # ᾱ_0 = 1 − β_0 = 1 − 0.00085; ᾱ_999 = Π(1 − β_i), β_i = (√0.00085 + i/999·(√0.012 − √0.00085))² ≈ 0.0046601
    import math

    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    by_hand = math.prod(1 - (lo + i / 999 * (hi - lo)) ** 2 for i in range(1000))
    assert ac[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert ac[-1].item() == pytest.approx(by_hand, rel=1e-5) == pytest.approx(0.0046601, rel=1e-4)


def test_encode_images_is_a_scaled_posterior_sample(from_folder):
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = ADAPTER.encode_images(from_folder, images, generator=torch.Generator().manual_seed(5))
    assert latents.shape == (2, 4, 8, 6)
    posterior = from_folder.vae.encode(images).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(5)) * 0.18215
    torch.testing.assert_close(latents, expected)
    assert not torch.allclose(latents, posterior.mode() * 0.18215)  # a sample, not the mode (KS)


def test_pipeline_makes_a_64px_image_in_two_steps(from_folder):
    pipe = ADAPTER.pipeline(from_folder)
    assert pipe.safety_checker is None and pipe.unet is from_folder.denoiser
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


# ----------------------------------------------------------------------------------------------
# Text: clip_skip and max_token_length (KS semantics)
# ----------------------------------------------------------------------------------------------
def test_clip_skip_is_penultimate_layer_then_final_layer_norm(sd1):
    base = ADAPTER.load(SD1Options(sd1["diffusers"]))
    skip1 = ADAPTER.load(SD1Options(sd1["diffusers"], clip_skip=1))
    skip2 = ADAPTER.load(SD1Options(sd1["diffusers"], clip_skip=2))
    h_none = _encode(base)["encoder_hidden_states"]
    h1, h2 = _encode(skip1)["encoder_hidden_states"], _encode(skip2)["encoder_hidden_states"]
    torch.testing.assert_close(h1, h_none)   # layer −1 + final norm is the plain last hidden state
    assert not torch.allclose(h2, h1, atol=1e-3)
    # Manual: the same weights in a 1-layer CLIP (layer −2 of 2 = layer 0); its output is final_layer_norm(layer 0).
    import copy

    from transformers import CLIPTextModel

    te = base.text_encoders[0]
    config = copy.deepcopy(te.config)
    config.num_hidden_layers = 1
    truncated = CLIPTextModel(config).eval()
    missing, unexpected = truncated.load_state_dict(
        {k: v for k, v in te.state_dict().items() if ".layers.1." not in k}, strict=False)
    assert not missing and not unexpected
    manual = truncated(ADAPTER.tokenize(base, CAPTIONS)[0])[0]
    torch.testing.assert_close(h2, manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="--clip_skip"):
        ADAPTER.load(SD1Options(sd1["diffusers"], clip_skip=3))


def test_max_token_length_150_shapes_and_chunks(sd1):
    models = ADAPTER.load(SD1Options(sd1["diffusers"], max_token_length=150))
    tok = models.tokenizers[0]
    long_caption = " ".join(["cat", "dog"] * 45)  # 90 tokens: spills into the second chunk
    ids = ADAPTER.tokenize(models, [long_caption, "a cat"])[0]
    assert ids.shape == (2, 154)  # 2 chunks × 77
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = tok([long_caption], padding="max_length", truncation=True, max_length=152, return_tensors="pt").input_ids[0]
    # chunk c = <BOS> ‖ tokens[1+75c : 76+75c] ‖ last id (SD1: pad = eos)
    assert torch.equal(ids[0, :77], torch.cat([plain[:1], plain[1:76], plain[-1:]]))
    assert torch.equal(ids[0, 77:], torch.cat([plain[:1], plain[76:151], plain[-1:]]))
    assert ids[1, 77].item() == bos and (ids[1, 78:] == eos).all()  # empty second chunk: <BOS> <EOS>…
    hidden = ADAPTER.encode_text(models, [ids])["encoder_hidden_states"]
    assert hidden.shape == (2, 152, 32)  # 2 + 150 (KS: first <BOS>, 2×75 bodies, last <EOS>)
    per_chunk = models.text_encoders[0](ids.reshape(4, 77))[0].reshape(2, 154, 32)
    expected = torch.cat([per_chunk[:, :1], per_chunk[:, 1:76], per_chunk[:, 78:153], per_chunk[:, 153:]], dim=1)
    torch.testing.assert_close(hidden, expected)
    models225 = ADAPTER.load(SD1Options(sd1["diffusers"], max_token_length=225))
    assert _encode(models225)["encoder_hidden_states"].shape == (2, 227, 32)
    with pytest.raises(UserError, match="--max_token_length"):
        ADAPTER.load(SD1Options(sd1["diffusers"], max_token_length=100))


def test_chunk_token_ids_sd2_padding_repair():
    """KS get_input_ids for pad ≠ eos (SD2 pads with '!'=0): BOS=9, EOS=8, PAD=0, tokens 1..."""
    bos, eos, pad = 9, 8, 0
    n_tok = 80  # spills 5 tokens into chunk 2
    long_ids = torch.tensor([[bos] + list(range(1, n_tok + 1)) + [eos] + [pad] * (152 - n_tok - 2)])
    short_ids = torch.tensor([[bos, 1, 2, eos] + [pad] * 148])
    out = chunk_token_ids(torch.cat([long_ids, short_ids]), eos_id=eos, pad_id=pad)
    assert out.shape == (2, 154)
    # long: chunk 1 ends in a real token (75) then the row's last id (pad) -> that pad becomes <EOS>
    assert out[0, :77].tolist() == [bos] + list(range(1, 76)) + [eos]
    assert out[0, 77:].tolist() == [bos, 76, 77, 78, 79, 80, eos] + [pad] * 70
    # short: chunk 2 is empty -> <BOS> <EOS> <PAD>…; chunk 1 keeps its <EOS> and padding
    assert out[1, :77].tolist() == [bos, 1, 2, eos] + [pad] * 73
    assert out[1, 77:].tolist() == [bos, eos] + [pad] * 75
    # pad == eos (SD1): no repair at all
    sd1 = chunk_token_ids(torch.tensor([[bos] + list(range(1, 151)) + [eos]]), eos_id=eos, pad_id=eos)
    assert sd1[0, 76].item() == eos and sd1[0, 77:79].tolist() == [bos, 76]


def test_merge_chunk_states_picks_bos_bodies_and_last():
    hidden = torch.arange(3 * 77, dtype=torch.float32).reshape(1, 231, 1).expand(2, 231, 3)
    merged = merge_chunk_states(hidden, 3)
    positions = merged[0, :, 0].long().tolist()
    assert merged.shape == (2, 227, 3)
    assert positions == [0] + list(range(1, 76)) + list(range(78, 153)) + list(range(155, 230)) + [230]
    assert torch.equal(merge_chunk_states(hidden[:, :77], 1), hidden[:, :77])


# ----------------------------------------------------------------------------------------------
# Shipped configs and tokenizer
# ----------------------------------------------------------------------------------------------
def test_shipped_configs_are_the_real_architectures():
    """Parameter counts of SD1.5 / SD2 (public figures) built on the meta device from configs/models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd2v": (865_910_724, 83_653_863, 340_387_840)}
    for key, counts in expected.items():
        root = loading.config_dir_for(key, None)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(root, "unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(root, "vae")))
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(root, "text_encoder")))
        got = tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, te))
        assert got == counts, key
        scheduler = loading.read_scheduler_config(root)
        assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == \
               (0.00085, 0.012, "scaled_linear")


def test_shipped_clip_tokenizer_reproduces_clip_ids():
    sd15 = loading.load_clip_tokenizer(loading.config_dir_for("sd15", None), "tokenizer")
    # sd2v ships only its tokenizer_config.json (pad "!"); the BPE files come from sd15
    sd2 = loading.load_clip_tokenizer(loading.config_dir_for("sd2v", None), "tokenizer")
    # openai/clip-vit-large-patch14: "a photo of a cat" -> these ids (BOS 49406, EOS 49407)
    assert sd15("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(sd15) == 49408 and sd15.pad_token_id == 49407
    assert sd2("A Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sd2.pad_token_id == 0  # SD2 pads with "!" (id 0)


# ----------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------
def test_make_tiny_model_tool_output_loads_both_ways(tmp_path, capsys):
    from tools.make_tiny_model import main

    out, single = str(tmp_path / "tiny"), str(tmp_path / "tiny.safetensors")
    assert main(["--out", out, "--single_file", single, "--v_prediction", "--seed", "3"]) == 0
    assert f"model_config: {tmp_path / 'tiny_config'}" in capsys.readouterr().out
    a = ADAPTER.load(SD1Options(out, v_parameterization=True))
    b = ADAPTER.load(SD1Options(single, model_config=str(tmp_path / "tiny_config"), v_parameterization=True))
    assert _state_dicts_equal(a.denoiser, b.denoiser)
    assert loading.read_scheduler_config(out)["prediction_type"] == "v_prediction"
    assert not os.path.exists(tmp_path / "tiny_config" / "unet" / "diffusion_pytorch_model.safetensors")
    assert main(["--out", out, "--family", "sdxl", "--v2"]) == 2
    assert "--v2: only supported with --family sd1" in capsys.readouterr().err


def test_make_demo_data_writes_a_kohya_folder(tmp_path):
    from PIL import Image

    from tools.make_demo_data import make_demo_data

    folder = make_demo_data(str(tmp_path), repeats=10, class_tokens="sks photo")
    assert os.path.basename(folder) == "10_sks photo"
    names = sorted(os.listdir(folder))
    images = [n for n in names if not n.endswith(".txt")]
    captions = [n for n in names if n.endswith(".txt")]
    assert len(images) == 8 and len(captions) == 6
    sizes = set()
    for name in images:
        with Image.open(os.path.join(folder, name)) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
    aspect = {w / h > 1.05 for w, h in sizes} | {w / h < 0.95 for w, h in sizes}
    assert len(sizes) >= 6 and aspect == {True, False}  # landscape, portrait and square all present
    with open(os.path.join(folder, "chelsea.txt"), encoding="utf-8") as f:
        assert f.read().startswith("sks photo, a tabby cat")

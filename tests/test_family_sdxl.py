"""SDXL adapter: loading (diffusers folder == SAI single file), --model_config, text encoding semantics,
size conditioning, chunked tokens, pipeline."""
from __future__ import annotations

import os

import pytest
import torch

from library.errors import UserError
from library.families.base import ModelOptions
from library.families.loading import REPO_CONFIG_ROOT
from library.families.loading import load_clip_tokenizer
from library.families.sdxl import ADAPTER, sdxl_time_ids
from tests.fixtures.tiny_sdxl import write_tiny_sdxl

CAPTIONS = ["a photo of a cat sitting on a red car", "dog"]


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    return write_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def from_diffusers(tiny_files):
    return ADAPTER.load(ModelOptions(tiny_files.diffusers_dir))


@pytest.fixture(scope="session")
def from_single_file(tiny_files):
    return ADAPTER.load(ModelOptions(tiny_files.single_file, model_config=tiny_files.config_dir))


def _modules(models):
    return {"unet": models.denoiser, "vae": models.vae, "text_encoder": models.text_encoders[0],
            "text_encoder_2": models.text_encoders[1]}


def _noisy_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700])[:batch]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def test_diffusers_folder_and_sai_single_file_load_identical_weights(tiny_files, from_diffusers, from_single_file):
    original = {"unet": tiny_files.pipe.unet, "vae": tiny_files.pipe.vae,
                "text_encoder": tiny_files.pipe.text_encoder, "text_encoder_2": tiny_files.pipe.text_encoder_2}
    from_folder = _modules(from_diffusers)
    for name, module in _modules(from_single_file).items():
        loaded, other, reference = module.state_dict(), from_folder[name].state_dict(), original[name].state_dict()
        assert set(loaded) == set(reference) == set(other), name
        for key, value in reference.items():
            # exact equality, shapes included: e.g. the VAE mid-attention is stored as 1x1 convs in the SAI layout
            assert torch.equal(loaded[key], value), f"{name}.{key}"
            assert torch.equal(other[key], value), f"{name}.{key}"
    assert torch.equal(from_diffusers.alphas_cumprod, from_single_file.alphas_cumprod)


def test_single_file_open_clip_g_is_packed_in_proj(tiny_files):
    """The SAI file stores OpenCLIP-G attention as one in_proj_weight [3·width, width] = [q; k; v]."""
    from safetensors import safe_open

    layer = tiny_files.pipe.text_encoder_2.text_model.encoder.layers[1].self_attn
    with safe_open(tiny_files.single_file, "pt") as f:
        packed = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert packed.shape == (96, 32)
    assert torch.equal(packed[32:64], layer.k_proj.weight)
    assert torch.equal(projection, tiny_files.pipe.text_encoder_2.text_projection.weight.T)


def test_predict_is_the_same_for_both_sources(from_diffusers, from_single_file):
    noisy, timesteps = _noisy_inputs()
    with torch.no_grad():
        outputs = []
        for models in (from_diffusers, from_single_file):
            conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))
            outputs.append(ADAPTER.predict(models, noisy, timesteps, conditioning, {}))
    assert outputs[0].shape == noisy.shape
    assert outputs[0].abs().mean() > 0
    assert torch.equal(outputs[0], outputs[1])


def test_model_config_overrides_the_shipped_architecture(tiny_files, from_single_file):
    # with the tiny --model_config the UNet has the tiny architecture ...
    assert from_single_file.denoiser.config.cross_attention_dim == 64
    assert from_single_file.text_encoders[1].config.hidden_size == 32
    # ... and without it the shipped SDXL 1.0 configs are used, which the tiny checkpoint does not fit
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(ModelOptions(tiny_files.single_file))


def test_vae_flag_replaces_the_vae(tiny_files, tmp_path):
    """--vae with a diffusers VAE folder; here a second tiny model's VAE, so the weights must differ."""
    other = write_tiny_sdxl(str(tmp_path), seed=1)
    models = ADAPTER.load(ModelOptions(tiny_files.single_file, model_config=tiny_files.config_dir,
                                       vae=os.path.join(other.diffusers_dir, "vae")))
    for key, value in other.pipe.vae.state_dict().items():
        assert torch.equal(models.vae.state_dict()[key], value), key
    assert not torch.equal(models.vae.encoder.conv_in.weight, tiny_files.pipe.vae.encoder.conv_in.weight)


def test_shipped_configs_are_sdxl_base_1_0():
    """Parameter counts of stabilityai/stable-diffusion-xl-base-1.0 (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = os.path.join(REPO_CONFIG_ROOT, "sdxl")
    with torch.device("meta"):
        modules = [
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(root, "unet"))),
            AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(root, "vae"))),
            CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(root, "text_encoder"))),
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(os.path.join(root, "text_encoder_2"))),
        ]
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_shipped_tokenizers_share_the_sd15_bpe_with_sdxl_padding():
    tokenizer = load_clip_tokenizer(os.path.join(REPO_CONFIG_ROOT, "sdxl"), "tokenizer")
    tokenizer_2 = load_clip_tokenizer(os.path.join(REPO_CONFIG_ROOT, "sdxl"), "tokenizer_2", "!")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=10).input_ids
    ids_2 = tokenizer_2("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]
    assert ids_2 == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]  # "!" is id 0


def test_invalid_flags_are_user_errors(tiny_files):
    with pytest.raises(UserError, match="--max_token_length"):
        ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, max_token_length=100))


@pytest.mark.parametrize("flag", [["--precondition_outputs"]])
def test_other_families_flags_are_not_sdxl_flags(flag, capsys):
    """SDXL's options have no --precondition_outputs: sdxl_train_network.py rejects it. (--v2 and --clip_skip are
    KS flags of sdxl_train_network.py: parsed, then refused / noted before models load, tests/test_ks_compat.py.)"""
    from library import train_util
    from library.errors import UserError

    with pytest.raises(UserError, match=f"unknown flag '{flag[0]}'"):  # one line, no argparse usage dump
        train_util.parse_args("sdxl", flag)


def test_model_config_with_a_diffusers_folder_is_a_user_error(tiny_files):
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, model_config=tiny_files.config_dir))


def test_non_sdxl_single_file_is_a_user_error(tmp_path, tiny_files):
    from safetensors.torch import load_file, save_file

    sd1_like = {k: v for k, v in load_file(tiny_files.single_file).items() if not k.startswith("conditioner.")}
    path = str(tmp_path / "not_sdxl.safetensors")
    save_file(sd1_like, path)
    with pytest.raises(UserError, match="not an SDXL"):
        ADAPTER.load(ModelOptions(path, model_config=tiny_files.config_dir))


def test_prediction_type_and_scheduler_follow_v_parameterization(tiny_files):
    assert ADAPTER.prediction_type(ModelOptions("x")) == "epsilon"
    assert ADAPTER.prediction_type(ModelOptions("x", v_parameterization=True)) == "v_prediction"
    models = ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, v_parameterization=True))
    assert models.scheduler_config["prediction_type"] == "v_prediction"
    # ᾱ is the scheduler's own (before any zero-terminal-SNR rescale, which only the sampling config gets)
    assert torch.allclose(models.alphas_cumprod, tiny_files.pipe.scheduler.alphas_cumprod, atol=1e-7)
    zero_snr = ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, zero_terminal_snr=True))
    assert zero_snr.scheduler_config["rescale_betas_zero_snr"] is True
    assert torch.equal(zero_snr.alphas_cumprod, models.alphas_cumprod)


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------
def _capture_layer_outputs(encoder):
    """Forward hooks on every encoder layer: an independent record of each layer's output."""
    layers = encoder.text_model.encoder.layers if hasattr(encoder, "text_model") else encoder.encoder.layers
    captured = []
    handles = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers]
    return captured, handles


def test_encode_text_is_penultimate_l_and_g_plus_pooled_g(from_diffusers):
    models = from_diffusers
    clip_l, open_clip_g = models.text_encoders
    tokens = ADAPTER.tokenize(models, CAPTIONS)
    captured_l, handles_l = _capture_layer_outputs(clip_l)
    captured_g, handles_g = _capture_layer_outputs(open_clip_g)
    try:
        with torch.no_grad():
            out = ADAPTER.encode_text(models, tokens)
    finally:
        for h in handles_l + handles_g:
            h.remove()
    hidden, pooled = out["encoder_hidden_states"], out["text_embeds"]
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 32)
    # penultimate layer = output of layer N−2 (of 2 layers: layer 0), no final layer norm
    assert torch.equal(hidden[..., :32], captured_l[0])
    assert torch.equal(hidden[..., 32:], captured_g[0])
    # pooled: final layer norm of the last layer at the first <EOS>, through the text projection
    g = open_clip_g.text_model
    eos = (tokens[1] == models.tokenizers[1].eos_token_id).int().argmax(dim=1)
    final = g.final_layer_norm(captured_g[1])[torch.arange(2), eos]
    assert torch.allclose(pooled, open_clip_g.text_projection(final), atol=1e-6)
    # and the penultimate layer is not the final one
    assert not torch.allclose(hidden[..., 32:], captured_g[1])


def test_encode_text_outputs_slice_per_sample(from_diffusers):
    """Text-encoder caching stores one sample's slice; batch encoding must equal single-sample encoding."""
    models = from_diffusers
    with torch.no_grad():
        both = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))
        second = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS[1:]))
    for key in ("encoder_hidden_states", "text_embeds"):
        assert both[key].shape[0] == 2
        assert torch.allclose(both[key][1:], second[key], atol=1e-6)


def test_max_token_length_windows_are_well_formed_for_both_tokenizers(tiny_files):
    """KS get_input_ids: 150 tokens = two <BOS> 75 <EOS|PAD> windows. tokenizer_2 pads with '!', so a window
    cut mid-caption gets an <EOS> in its last slot."""
    models = ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, max_token_length=150))
    caption = "cat " * 100                                    # 100 tokens: 75 in window 0, 25 in window 1
    for tokenizer, ids in zip(models.tokenizers, ADAPTER.tokenize(models, [caption])):
        cat, eos, pad = tokenizer.convert_tokens_to_ids("cat</w>"), tokenizer.eos_token_id, tokenizer.pad_token_id
        windows = ids.reshape(2, 77)
        assert windows[:, 0].tolist() == [tokenizer.bos_token_id] * 2
        assert windows[0, 1:76].tolist() == [cat] * 75 and windows[0, 76] == eos
        assert windows[1, 1:26].tolist() == [cat] * 25 and windows[1, 26] == eos
        assert windows[1, 27:].tolist() == [pad] * 50
    assert models.tokenizers[1].pad_token_id != models.tokenizers[1].eos_token_id   # the '!' case was exercised


def test_max_token_length_150_extends_the_context(tiny_files):
    models = ADAPTER.load(ModelOptions(tiny_files.diffusers_dir, max_token_length=150))
    short = ADAPTER.load(ModelOptions(tiny_files.diffusers_dir))
    with torch.no_grad():
        tokens = ADAPTER.tokenize(models, CAPTIONS)
        long_out = ADAPTER.encode_text(models, tokens)
        short_out = ADAPTER.encode_text(short, ADAPTER.tokenize(short, CAPTIONS))
    assert [t.shape for t in tokens] == [(2, 154), (2, 154)]
    assert long_out["encoder_hidden_states"].shape == (2, 152, 64)
    # short captions: the first window is the 77-token prompt, so its states and the pooled vector agree
    assert torch.allclose(long_out["encoder_hidden_states"][:, :76], short_out["encoder_hidden_states"][:, :76])
    assert torch.allclose(long_out["text_embeds"], short_out["text_embeds"])


# ----------------------------------------------------------------------------------------------
# Size conditioning
# ----------------------------------------------------------------------------------------------
def test_time_ids_order_is_original_crop_target():
    ids = sdxl_time_ids(torch.tensor([[1024, 768], [512, 512]]), torch.tensor([[0, 32], [16, 0]]),
                        torch.tensor([[1024, 1024], [768, 512]]))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[1024, 768, 0, 32, 1024, 1024], [512, 512, 16, 0, 768, 512]]


def test_predict_uses_the_batch_size_conditioning(from_diffusers):
    models = from_diffusers
    noisy, timesteps = _noisy_inputs()
    sizes = {"original_sizes": torch.tensor([[64, 64], [64, 64]]), "crop_top_lefts": torch.zeros(2, 2).long(),
             "target_sizes": torch.tensor([[64, 64], [64, 64]])}
    bigger = dict(sizes, original_sizes=torch.tensor([[64, 64], [1024, 512]]))
    with torch.no_grad():
        conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))
        base = ADAPTER.predict(models, noisy, timesteps, conditioning, sizes)
        changed = ADAPTER.predict(models, noisy, timesteps, conditioning, bigger)
        default = ADAPTER.predict(models, noisy, timesteps, conditioning, {})
    assert torch.equal(changed[0], base[0])               # sample 0 unchanged
    assert (changed[1] - base[1]).abs().max() > 1e-4      # sample 1: original size changed the output
    assert torch.equal(default, base)                     # absent: latent 8x8 · 8 = 64, no crop


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------
def test_pipeline_makes_a_64px_image_in_2_steps(from_diffusers):
    pipe = ADAPTER.pipeline(from_diffusers)
    assert pipe.unet is from_diffusers.denoiser and pipe.text_encoder_2 is from_diffusers.text_encoders[1]
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0

"""SD3 adapter: loading (diffusers folder / SAI single file, with and without T5), text conditioning against
diffusers' StableDiffusion3Pipeline.encode_prompt, latents, predict, pipeline. Tiny random models, offline."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.families import sd3
from library.families.base import Models
from library.families.sd3 import ADAPTER, SD3Options
from library.sd3_convert import CLIP_G_PREFIX, CLIP_L_PREFIX, mmdit_to_sai
from tests.fixtures.tiny_sd3 import write_tiny_sd3, without_t5

CAPTIONS = ["a photo of a cat sitting in a field", "red dog"]
T5_LEN = 77   # --t5xxl_max_token_length for the tiny model (256 is the default)
SOURCES = ("diffusers", "diffusers_no_t5", "single_file", "single_file_no_t5")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return write_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


def options(tiny, source: str, **kwargs) -> SD3Options:
    path = {"diffusers": tiny.diffusers_dir, "diffusers_no_t5": tiny.diffusers_no_t5_dir,
            "single_file": tiny.single_file, "single_file_no_t5": tiny.single_file_no_t5}[source]
    model_config = tiny.config_dir if source.startswith("single_file") else None
    return SD3Options(path, model_config=model_config, t5xxl_max_token_length=T5_LEN, **kwargs)


@pytest.fixture(scope="session")
def loaded(tiny):
    """Models per source, loaded once per session."""
    return {source: ADAPTER.load(options(tiny, source)) for source in SOURCES}


def reference_modules(pipe, with_t5: bool) -> dict[str, torch.nn.Module]:
    modules = {"denoiser": pipe.transformer, "vae": pipe.vae, "clip_l": pipe.text_encoder,
               "clip_g": pipe.text_encoder_2}
    if with_t5:
        modules["t5"] = pipe.text_encoder_3
    return modules


def loaded_modules(models: Models) -> dict[str, torch.nn.Module]:
    names = ("clip_l", "clip_g", "t5")
    return {"denoiser": models.denoiser, "vae": models.vae, **dict(zip(names, models.text_encoders))}


def fixed_inputs(batch: int = 2, seq: int = 2 * 77, width: int = 64, pooled: int = 64):
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(batch, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.25, 0.9])[:batch]
    conditioning = {"encoder_hidden_states": torch.randn(batch, seq, width, generator=generator),
                    "pooled_projections": torch.randn(batch, pooled, generator=generator)}
    return noisy, 1000.0 * sigmas, conditioning


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
def test_sai_mmdit_layout_round_trips_through_diffusers_converter(tiny):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    original = tiny.pipe.transformer.state_dict()
    sai = mmdit_to_sai(original, tiny.pipe.transformer.config.num_layers)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in sai
    assert sai["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape[0] == \
        3 * original["transformer_blocks.0.attn.to_q.weight"].shape[0]
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_shipped_config_is_sd3_medium():
    """configs/models/sd3 builds the SD3-medium sizes (on the meta device: no memory)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from library.families.loading import REPO_CONFIG_ROOT
    root = os.path.join(REPO_CONFIG_ROOT, "sd3")
    with torch.device("meta"):
        mmdit = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(root, subfolder="transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root, subfolder="text_encoder_2"))
        t5 = T5EncoderModel(T5Config.from_pretrained(root, subfolder="text_encoder_3"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert round(count(mmdit) / 1e6) == 2028        # "SD3 medium: 2B parameters"
    assert round(count(vae) / 1e6, 1) == 83.8
    assert round(count(clip_g) / 1e6) == 695        # OpenCLIP bigG text tower + projection
    assert t5.config.d_model == mmdit.config.joint_attention_dim == 4096
    assert clip_g.config.hidden_size + 768 == mmdit.config.pooled_projection_dim == 2048
    assert (vae.config.shift_factor, vae.config.scaling_factor, vae.config.latent_channels) == (0.0609, 1.5305, 16)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_loads_the_same_weights(tiny, loaded, source):
    models = loaded[source]
    with_t5 = not source.endswith("no_t5")
    assert len(models.text_encoders) == len(models.tokenizers) == (3 if with_t5 else 2)
    expected = reference_modules(tiny.pipe, with_t5)
    got = loaded_modules(models)
    assert set(got) == set(expected)
    for name, module in expected.items():
        reference_state, loaded_state = module.state_dict(), got[name].state_dict()
        assert set(loaded_state) == set(reference_state), name
        different = [k for k in reference_state if not torch.equal(loaded_state[k], reference_state[k])]
        assert different == [], (name, different[:3])
    assert models.alphas_cumprod is None
    assert models.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert models.scheduler_config["shift"] == 3.0


def test_predict_is_identical_across_sources_and_equals_the_transformer(tiny, loaded):
    noisy, timesteps, conditioning = fixed_inputs()
    with torch.no_grad():
        expected = tiny.pipe.transformer(hidden_states=noisy, timestep=timesteps, return_dict=False,
                                         encoder_hidden_states=conditioning["encoder_hidden_states"],
                                         pooled_projections=conditioning["pooled_projections"])[0]
        outputs = [ADAPTER.predict(loaded[s], noisy, timesteps, conditioning, {}) for s in SOURCES]
    assert expected.shape == noisy.shape
    for output in outputs:
        assert torch.equal(output, expected)
    # the timestep really conditions the output (float 1000σ, not ignored)
    with torch.no_grad():
        other = ADAPTER.predict(loaded["diffusers"], noisy, timesteps.flip(0), conditioning, {})
    assert not torch.allclose(other, expected)


def test_single_file_needs_the_model_config_for_a_non_sd3_medium_architecture(tiny):
    """Without --model_config the shipped SD3-medium config is used: the tiny file does not fit it."""
    opts = SD3Options(tiny.single_file_no_t5, t5xxl_max_token_length=T5_LEN)
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(opts)


def test_model_config_override_decides_the_architecture(tiny, tmp_path):
    """--model_config supplies configs, tokenizers and the scheduler: a changed shift shows up in the Models."""
    config_dir = shutil.copytree(tiny.config_dir, tmp_path / "config")
    (config_dir / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.5}')
    models = ADAPTER.load(SD3Options(tiny.single_file_no_t5, model_config=str(config_dir),
                                       t5xxl_max_token_length=T5_LEN))
    assert models.scheduler_config["shift"] == 1.5
    assert models.tokenizers[1].pad_token == "!" and models.tokenizers[0].pad_token == "<|endoftext|>"


def test_model_config_with_a_diffusers_folder_is_rejected(tiny):
    with pytest.raises(UserError, match="--model_config"):
        ADAPTER.load(SD3Options(tiny.diffusers_dir, model_config=tiny.config_dir))


def test_t5_weights_without_a_tokenizer_name_the_way_out(tiny, tmp_path, monkeypatch):
    config_dir = shutil.copytree(tiny.config_dir, tmp_path / "config")
    shutil.rmtree(config_dir / "tokenizer_3")
    monkeypatch.setattr(sd3, "CACHED_T5_TOKENIZERS", ())  # whatever this machine's HF cache holds
    with pytest.raises(UserError, match=r"tokenizer_3.*--t5xxl none"):
        ADAPTER.load(SD3Options(tiny.single_file, model_config=str(config_dir), t5xxl_max_token_length=T5_LEN))


def test_t5xxl_none_drops_t5(tiny):
    opts = options(tiny, "single_file")
    opts.t5xxl = sd3.NO_T5   # KS-style --t5xxl flag; not (yet) a SD3Options field
    models = ADAPTER.load(opts)
    assert len(models.text_encoders) == 2 and len(models.tokenizers) == 2


def test_separate_text_encoder_files(tiny, tmp_path):
    """A file without text encoders (like sd3_medium.safetensors) + --clip_l / --clip_g files (bare keys)."""
    from safetensors.torch import load_file

    full = load_file(tiny.single_file_no_t5)
    save_file({k: v for k, v in full.items() if not k.startswith("text_encoders.")}, tmp_path / "mmdit_vae.safetensors")
    save_file({k[len(CLIP_L_PREFIX):]: v for k, v in full.items() if k.startswith(CLIP_L_PREFIX)},
              tmp_path / "clip_l.safetensors")
    save_file({k[len(CLIP_G_PREFIX):]: v for k, v in full.items() if k.startswith(CLIP_G_PREFIX)},
              tmp_path / "clip_g.safetensors")
    opts = SD3Options(str(tmp_path / "mmdit_vae.safetensors"), model_config=tiny.config_dir)
    with pytest.raises(UserError, match="--clip_l: the checkpoint has no text_encoder weights"):
        ADAPTER.load(opts)
    opts.clip_l, opts.clip_g = str(tmp_path / "clip_l.safetensors"), str(tmp_path / "clip_g.safetensors")
    models = ADAPTER.load(opts)
    for got, expected in zip(models.text_encoders, (tiny.pipe.text_encoder, tiny.pipe.text_encoder_2)):
        reference = expected.state_dict()
        assert all(torch.equal(got.state_dict()[k], reference[k]) for k in reference)


@pytest.mark.parametrize("flag, value", [("v_parameterization", True), ("zero_terminal_snr", True),
                                         ("max_token_length", 150), ("t5xxl_max_token_length", 0)])
def test_options_that_mean_nothing_for_sd3_are_rejected(tiny, flag, value):
    opts = options(tiny, "diffusers")
    setattr(opts, flag, value)
    with pytest.raises(UserError, match=f"--{flag}"):
        ADAPTER.load(opts)


def test_prediction_type_and_constants(tiny):
    assert ADAPTER.prediction_type(options(tiny, "diffusers")) == "flow"
    assert ADAPTER.prediction_type(options(tiny, "diffusers", precondition_outputs=True)) == "flow_x0"
    assert (ADAPTER.name, ADAPTER.kind, ADAPTER.bucket_reso_steps) == ("sd3", "flow", 64)


# ----------------------------------------------------------------------------------------------
# Text, images, pipeline
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["diffusers", "diffusers_no_t5", "single_file"])
def test_encode_text_equals_pipeline_encode_prompt(tiny, loaded, source):
    models = loaded[source]
    pipe = tiny.pipe if source != "diffusers_no_t5" else without_t5(tiny.pipe)
    with torch.no_grad():
        tokens = ADAPTER.tokenize(models, CAPTIONS)
        got = ADAPTER.encode_text(models, tokens)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
    assert [t.shape for t in tokens][:2] == [torch.Size([2, 77])] * 2
    assert got["encoder_hidden_states"].shape == (2, 77 + T5_LEN, 64)
    assert got["pooled_projections"].shape == (2, 64)
    assert torch.equal(got["encoder_hidden_states"], embeds)
    assert torch.equal(got["pooled_projections"], pooled)
    t5_part = got["encoder_hidden_states"][:, 77:]
    assert (t5_part.abs().sum() == 0) == source.endswith("no_t5")


def test_encode_text_pads_clip_to_the_joint_width_when_t5_is_absent(loaded):
    """Real SD3: CLIP-L 768 + CLIP-G 1280 = 2048 < 4096. The tiny model has 32 + 32 = 64 = its joint width, so a
    transformer with joint_attention_dim 96 checks the zero padding against the pipeline."""
    from diffusers import SD3Transformer2DModel

    base = loaded["diffusers_no_t5"]
    wide = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                                 caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    models = Models(denoiser=wide, vae=base.vae, text_encoders=base.text_encoders, tokenizers=base.tokenizers,
                    scheduler_config=base.scheduler_config,
                    extra={"t5xxl_max_token_length": T5_LEN, "joint_attention_dim": 96})
    pipe = ADAPTER.pipeline(models)
    with torch.no_grad():
        got = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))["encoder_hidden_states"]
        expected = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                      do_classifier_free_guidance=False, max_sequence_length=T5_LEN)[0]
    assert got.shape == (2, 77 + T5_LEN, 96)
    assert torch.equal(got, expected)
    assert got[:, :77, 64:].abs().sum() == 0 and got[:, 77:].abs().sum() == 0
    assert got[:, :77, :64].abs().sum() > 0


def test_encode_text_is_per_sample(loaded):
    """Caching slices the batch: sample i of a batch equals the caption encoded alone."""
    models = loaded["single_file"]
    with torch.no_grad():
        batch = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))
        alone = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS[1:]))
    for key in ("encoder_hidden_states", "pooled_projections"):
        assert batch[key].shape[0] == 2
        torch.testing.assert_close(batch[key][1:], alone[key], rtol=1e-5, atol=1e-6)


def test_encode_images_shifts_then_scales_a_posterior_sample(loaded):
    models = loaded["diffusers"]
    vae = models.vae
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got = ADAPTER.encode_images(models, images, generator=torch.Generator().manual_seed(7))
        sample = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5305)
    assert got.shape == (2, 16, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, (sample - 0.0609) * 1.5305, rtol=0, atol=0)
    assert not torch.allclose(got, sample * 1.5305)   # the shift is there


@pytest.mark.parametrize("source", ["single_file", "diffusers_no_t5"])
def test_pipeline_makes_an_image(loaded, source):
    pipe = ADAPTER.pipeline(loaded[source])
    assert (pipe.text_encoder_3 is None) == source.endswith("no_t5")
    image = pipe("a red cat", height=64, width=64, num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert ((image >= 0) & (image <= 1)).all() and image.std() > 0


@pytest.mark.parametrize("source", ["diffusers", "single_file"])
def test_fp16_keeps_t5_feed_forward_output_in_fp32(tiny, source):
    models = ADAPTER.load(options(tiny, source, weight_dtype=torch.float16))
    t5 = models.text_encoders[2]
    ff = t5.encoder.block[0].layer[1].DenseReluDense
    assert (ff.wo.weight.dtype, ff.wi_0.weight.dtype) == (torch.float32, torch.float16)
    assert models.denoiser.dtype == models.text_encoders[0].dtype == torch.float16

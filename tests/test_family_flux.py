"""Flux.1 / Chroma adapter: BFL <-> diffusers conversion (against diffusers' own converters at full size), packing
and ids (against FluxPipeline), loading from a diffusers folder and from BFL files, text conditioning and masks,
guidance, prediction types, flag rules. Tiny random models, offline."""
from __future__ import annotations

import os

import pytest
import torch

from library import flux_convert, tiny_flux
from library.errors import UserError
from library.families import flux
from library.families.flux import ADAPTER, FluxOptions
from library.families.loading import REPO_CONFIG_ROOT

CAPTIONS = ["a photo of a cat", "red dog on a mat"]
T5_LEN = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (pipeline, diffusers dir, BFL files)} for dev, schnell and chroma."""
    out = {}
    for variant in tiny_flux.VARIANTS:
        root = str(tmp_path_factory.mktemp(f"tiny_{variant}"))
        pipe = tiny_flux.build(variant)
        pipe.save_pretrained(os.path.join(root, "diffusers"))
        out[variant] = (pipe, os.path.join(root, "diffusers"), tiny_flux.write_bfl_files(pipe, os.path.join(root, "bfl")))
    return out


def options(tiny, variant: str, source: str, **kwargs) -> FluxOptions:
    _, folder, files = tiny[variant]
    model_type = "chroma" if variant == "chroma" else "flux"
    if source == "diffusers":
        return FluxOptions(folder, model_type=model_type, t5xxl_max_token_length=T5_LEN, **kwargs)
    return FluxOptions(files["transformer"], model_config=files["model_config"], model_type=model_type,
                       clip_l=files.get("clip_l"), t5xxl=files["t5xxl"], ae=files["ae"],
                       t5xxl_max_token_length=T5_LEN, **kwargs)


@pytest.fixture(scope="module")
def loaded(tiny):
    return {(v, s): ADAPTER.load(options(tiny, v, s)) for v in tiny_flux.VARIANTS for s in ("diffusers", "bfl")}


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_bfl_round_trip_is_exact(tiny, variant):
    transformer = tiny[variant][0].transformer
    original = transformer.state_dict()
    layout = flux_convert.layout_of_model(transformer)
    bfl = flux_convert.diffusers_to_bfl(original, layout)
    assert flux_convert.detect_layout(bfl) == layout
    back, left = flux_convert.bfl_to_diffusers({flux_convert.BFL_PREFIX + k: v for k, v in bfl.items()})
    assert left == [] and set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("variant,config", [("dev", "flux-dev"), ("schnell", "flux-schnell"), ("chroma", "chroma")])
def test_full_size_table_matches_diffusers_converter(variant, config):
    """At the real width (3072) our table gives exactly the keys and shapes diffusers' own single-file converter
    gives, and diffusers recognises our BFL keys as this model (meta tensors: no memory)."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu

    cls = ChromaTransformer2DModel if variant == "chroma" else FluxTransformer2DModel
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(os.path.join(REPO_CONFIG_ROOT, config), subfolder="transformer"))
    reference = model.state_dict()
    bfl = flux_convert.diffusers_to_bfl(reference, flux_convert.layout_of_model(model))
    assert sfu.infer_diffusers_model_type(bfl) == {"dev": "flux-dev", "schnell": "flux-schnell",
                                                   "chroma": "chroma"}[variant]
    convert = (sfu.convert_chroma_transformer_checkpoint_to_diffusers if variant == "chroma"
               else sfu.convert_flux_transformer_checkpoint_to_diffusers)
    theirs = convert(dict(bfl))
    ours, left = flux_convert.bfl_to_diffusers(bfl)
    assert left == []
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours) == {k for k in reference if not k.endswith("mod_proj")}


def test_shipped_configs_are_the_real_models():
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import T5Config

    def count(cls, config):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(os.path.join(REPO_CONFIG_ROOT, config), subfolder="transformer"))
        return sum(p.numel() for p in model.parameters())

    assert round(count(FluxTransformer2DModel, "flux-dev") / 1e9, 1) == 11.9    # "12B"
    assert count(FluxTransformer2DModel, "flux-dev") - count(FluxTransformer2DModel, "flux-schnell") > 0
    assert round(count(ChromaTransformer2DModel, "chroma") / 1e9, 1) == 8.9      # "8.9B"
    vae = AutoencoderKL.load_config(os.path.join(REPO_CONFIG_ROOT, "flux-dev"), subfolder="vae")
    assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"]) == (16, 0.1159, 0.3611)
    assert T5Config.from_pretrained(os.path.join(REPO_CONFIG_ROOT, "chroma"), subfolder="text_encoder").d_model == 4096


# ----------------------------------------------------------------------------------------------
# Packing and ids
# ----------------------------------------------------------------------------------------------
def test_packing_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 4)
    assert torch.equal(flux.pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(flux.unpack_latents(flux.pack_latents(x), 6, 4), x)
    assert torch.equal(flux.image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))


def test_chroma_mask_keeps_one_padding_token():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert flux.chroma_text_mask(mask).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------------------------
# Loading, conditioning, predict
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_folder_and_bfl_files_load_the_same_model(tiny, loaded, variant):
    pipe = tiny[variant][0]
    for source in ("diffusers", "bfl"):
        models = loaded[(variant, source)]
        for mine, reference in ((models.denoiser, pipe.transformer), (models.vae, pipe.vae)):
            ref = reference.state_dict()
            assert all(torch.equal(mine.state_dict()[k], ref[k]) for k in ref)
        assert len(models.text_encoders) == (1 if variant == "chroma" else 2)
        assert models.extra["variant"] == variant


@pytest.mark.slow
@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_predict_is_the_transformer_on_packed_latents(tiny, loaded, variant):
    """predict(x, 1000σ) = unpack(transformer(pack(x), σ, ids, guidance)) as FluxPipeline / ChromaPipeline call it."""
    pipe = tiny[variant][0]
    models = loaded[(variant, "bfl")]
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 4, 6, generator=generator)
    with torch.no_grad():
        conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS))
        out = ADAPTER.predict(models, noisy, torch.tensor([250.0, 900.0]), conditioning, {})
        kwargs = dict(hidden_states=flux.pack_latents(noisy), timestep=torch.tensor([0.25, 0.9]),
                      encoder_hidden_states=conditioning["encoder_hidden_states"], img_ids=flux.image_ids(4, 6),
                      txt_ids=torch.zeros(T5_LEN, 3), return_dict=False)
        if variant == "chroma":
            kwargs["attention_mask"] = torch.cat([conditioning["text_mask"].bool(), torch.ones(2, 6, dtype=bool)], 1)
        else:
            kwargs["pooled_projections"] = conditioning["pooled_projections"]
            if variant == "dev":
                kwargs["guidance"] = torch.full((2,), 3.5)
        expected = flux.unpack_latents(pipe.transformer(**kwargs)[0], 4, 6)
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_modelspec_names_the_variant_read_from_the_model(loaded):
    """KS sai_model_spec: flux-1-dev / flux-1-schnell / chroma + '/lora', implementation BFL's repo or Chroma's;
    read from the model (the guidance embedder tells dev from schnell), from a folder or BFL files alike."""
    want = {"dev": ("flux-1-dev/lora", "https://github.com/black-forest-labs/flux"),
            "schnell": ("flux-1-schnell/lora", "https://github.com/black-forest-labs/flux"),
            "chroma": ("chroma/lora", "https://huggingface.co/lodestones/Chroma")}
    for (variant, source), models in loaded.items():
        spec = models.extra["metadata"]
        assert (spec["modelspec.architecture"], spec["modelspec.implementation"]) == want[variant], (variant, source)


def test_guidance_conditions_dev_only(loaded):
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for variant in ("dev", "schnell"):
        models = loaded[(variant, "diffusers")]
        with torch.no_grad():
            conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS[:1]))
            a = ADAPTER.predict(models, noisy, torch.tensor([500.0]), conditioning, {})
            models.extra["guidance_scale"] = 1.0
            b = ADAPTER.predict(models, noisy, torch.tensor([500.0]), conditioning, {})
            models.extra["guidance_scale"] = 3.5
        outputs[variant] = (a - b).abs().max().item()
    assert outputs["dev"] > 1e-4 and outputs["schnell"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("variant,masked", [("dev", True), ("dev", False), ("chroma", True)])
def test_t5_attention_mask_hides_padding(tiny, variant, masked):
    """With the mask (Flux --apply_t5_attn_mask; Chroma always) padded text positions cannot change the output;
    without it they do (KS: the transformer attends every T5 token)."""
    models = ADAPTER.load(options(tiny, variant, "diffusers", apply_t5_attn_mask=masked))
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, ["cat"]))
        base = ADAPTER.predict(models, noisy, torch.tensor([500.0]), conditioning, {})
        keep = conditioning["text_mask"][0].bool()
        altered = dict(conditioning)
        altered["encoder_hidden_states"] = conditioning["encoder_hidden_states"].clone()
        altered["encoder_hidden_states"][0, ~keep] = 50.0
        changed = (ADAPTER.predict(models, noisy, torch.tensor([500.0]), altered, {}) - base).abs().max().item()
    assert (changed == 0.0) == masked


def test_prediction_types():
    assert ADAPTER.prediction_type(FluxOptions("x", model_prediction_type="raw")) == "flow"
    assert ADAPTER.prediction_type(FluxOptions("x", model_prediction_type="additive")) == "flow"
    assert ADAPTER.prediction_type(FluxOptions("x")) == "flow_x0"   # KS default sigma_scaled


@pytest.mark.slow
def test_additive_adds_the_noisy_input(loaded):
    models = loaded[("schnell", "diffusers")]
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conditioning = ADAPTER.encode_text(models, ADAPTER.tokenize(models, CAPTIONS[:1]))
        raw = ADAPTER.predict(models, noisy, torch.tensor([500.0]), conditioning, {})
        models.extra["additive"] = True
        additive = ADAPTER.predict(models, noisy, torch.tensor([500.0]), conditioning, {})
        models.extra["additive"] = False
    assert torch.allclose(additive, raw + noisy)


@pytest.mark.slow
def test_latents_are_shifted_and_scaled(loaded, tiny):
    models = loaded[("dev", "bfl")]
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = ADAPTER.encode_images(models, images, torch.Generator().manual_seed(5))
        raw = tiny["dev"][0].vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(5))
    assert z.shape == (1, 16, 4, 4)
    assert torch.allclose(z, (raw - 0.1159) * 0.3611)


# ----------------------------------------------------------------------------------------------
# Flag rules and errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,flag", [
    (dict(split_mode=True), "--split_mode"),
    (dict(v_parameterization=True), "--v_parameterization"), (dict(max_token_length=225), "--max_token_length"),
    (dict(t5xxl_max_token_length=1000), "--t5xxl_max_token_length"),
    (dict(model_type="chroma", guidance_scale=1.0), "--guidance_scale"),
    (dict(model_type="chroma", clip_l="x"), "--clip_l"), (dict(blocks_to_swap=-1), "--blocks_to_swap")])
def test_refused_flags_name_themselves(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        flux.check(FluxOptions("model", **kwargs))


def test_blocks_to_swap_is_accepted_with_a_note():
    flux.check(FluxOptions("model", blocks_to_swap=18))
    assert any("--blocks_to_swap" in n for n in flux.notes(FluxOptions("model", blocks_to_swap=18)))


@pytest.mark.slow
def test_wrong_model_type_and_missing_files_are_user_errors(tiny):
    _, folder, files = tiny["chroma"]
    with pytest.raises(UserError, match="--model_type chroma"):
        ADAPTER.load(FluxOptions(folder, model_type="flux"))
    with pytest.raises(UserError, match="--model_type chroma"):
        ADAPTER.load(FluxOptions(files["transformer"], model_type="flux", t5xxl=files["t5xxl"], ae=files["ae"]))
    dev_files = tiny["dev"][2]
    with pytest.raises(UserError, match="--t5xxl"):
        ADAPTER.load(FluxOptions(dev_files["transformer"], model_config=dev_files["model_config"],
                                 clip_l=dev_files["clip_l"], ae=dev_files["ae"]))
    with pytest.raises(UserError, match="--clip_l"):
        ADAPTER.load(FluxOptions(dev_files["transformer"], model_config=dev_files["model_config"],
                                 t5xxl=dev_files["t5xxl"], ae=dev_files["ae"]))

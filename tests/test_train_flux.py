"""flux_train_network.py / chroma_train_network.py end to end on tiny Flux.1 dev and Chroma: LoRA files that
diffusers' FluxPipeline / ChromaPipeline load with every module attached, resume = uninterrupted run, every loss
and timestep option family through the engine, KS's documented recipes from TOML, make_tiny_model and
show_timesteps for the new families."""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from library import checkpointing
from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess

T5_LEN = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{variant: paths} of tiny dev and Chroma models: a diffusers folder plus BFL single files."""
    from library.families import flux

    root = tmp_path_factory.mktemp("flux_models")
    return {variant: flux.write_tiny_model(str(root / variant), single_file=str(root / variant / "bfl" / "model.safetensors"),
                                           variant=variant)
            for variant in ("dev", "chroma")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_data")
    make_images(str(root / "2_sks photo"), 2, size=(64, 64))
    return str(root)


def flux_argv(paths: dict, data: str, out: str, steps: int = 2, folder: bool = True, **extra) -> list[str]:
    model = paths["diffusers"] if folder else paths["single_file"]
    files = {} if folder else dict(model_config=paths["model_config"], t5xxl=paths["t5xxl"], ae=paths["ae"],
                                   clip_l=paths.get("clip_l"))
    chroma = "clip_l" not in paths
    defaults = dict(network_module="networks.lora_flux", t5xxl_max_token_length=T5_LEN,
                    guidance_scale=0.0 if chroma else 1.0, model_prediction_type="raw")
    return base_argv(model, data, out, steps=steps, **{**defaults, **files, **extra})


def lora_parts(sd: dict) -> int:
    """diffusers LoRA layers a KS Flux file makes: fused qkv = 3, linear1 = 4, everything else 1."""
    names = {k.split(".")[0] for k in sd if not k.startswith("lora_te3")}
    return sum(3 if n.endswith("qkv") else 4 if n.endswith("linear1") else 1 for n in names)


# ----------------------------------------------------------------------------------------------
# diffusers loads what we train
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_lora_loads_in_diffusers_with_every_module_and_changes_the_image(models, dataset, tmp_path, variant):
    """Trained from the BFL files (KS's way), loaded by FluxPipeline / ChromaPipeline.load_lora_weights (its KS
    converter): one LoRA layer per diffusers part of every file module, and a different image. Double blocks
    only: diffusers' converter hard-codes the 3072-wide single-block split (tests/test_lora_flux.py checks it at
    full width)."""
    from diffusers import ChromaPipeline, FluxPipeline
    from peft.tuners.lora import LoraLayer

    paths = models[variant]
    script = "chroma" if variant == "chroma" else "flux"
    path = run_inprocess(script, flux_argv(paths, dataset, str(tmp_path), steps=3, folder=False,
                                           network_args=["train_blocks=double"], apply_t5_attn_mask=True))
    sd = lora_tensors(path)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in sd)
    assert any(k.startswith("lora_te1_") for k in sd) == (variant == "dev")   # CLIP-L trains unless unet-only
    pipe = (ChromaPipeline if variant == "chroma" else FluxPipeline).from_pretrained(paths["diffusers"])
    kwargs = dict(prompt="sks photo", num_inference_steps=2, height=32, width=32, output_type="np",
                  max_sequence_length=T5_LEN)
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(path)
    attached = sum(isinstance(m, LoraLayer) for part in (pipe.transformer, pipe.text_encoder)
                   for m in part.modules())
    assert attached == lora_parts(sd)
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_equals_uninterrupted_run(models, dataset, tmp_path):
    """State saved at step 2 (of 4 batches per epoch), resumed to step 4: bit-identical LoRA (CLIP-L and
    transformer, flux_shift sampling, a loss map) and only the last 2 steps ran."""
    from library import training_loop

    common = dict(save_every_n_steps=2, save_state=True, timestep_sampling="flux_shift", loss_map_offset=True)
    full = run_inprocess("flux", flux_argv(models["dev"], dataset, str(tmp_path / "full"), steps=4, **common))
    state = str(tmp_path / "full" / (checkpointing.step_name("lora", 2) + "-state"))
    assert os.path.isdir(state), os.listdir(tmp_path / "full")
    calls = []
    real = training_loop._forward_backward
    training_loop._forward_backward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        resumed = run_inprocess("flux", flux_argv(models["dev"], dataset, str(tmp_path / "resumed"), steps=4,
                                                  resume=state, **common))
    finally:
        training_loop._forward_backward = real
    assert len(calls) == 2
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and any(k.startswith("lora_te1_") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Every loss and timestep option family through the engine
# ----------------------------------------------------------------------------------------------
LOSS_OPTIONS = {
    "l1": dict(loss_type="l1"),
    "huber_snr": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=2.0),
    "huber_exponential": dict(loss_type="huber", huber_schedule="exponential"),
    "smooth_l1_constant": dict(loss_type="smooth_l1", huber_schedule="constant"),
    "combined": dict(loss_type="combined", loss_weights="mse=0.5,l1=0.3,cosine=0.2", cosine_dim="channel"),
    "ew": dict(loss_type="ew"),
    "clustered_mse_masked_offset": dict(loss_type="clustered_mse", loss_map_offset=True),
    "min_snr": dict(min_snr_gamma=5),
    "debiased": dict(debiased_estimation_loss=True),
    "sigma_sqrt": dict(weighting_scheme="sigma_sqrt"),
    "cosmap_weight": dict(weighting_scheme="cosmap"),
    "loss_curve_offset": dict(loss_curve_offset=0.3, loss_curve_offset_schedule=0.2),
    "loss_map_sampling": dict(timestep_sampling="loss_map", loss_map_unbiased=True, loss_map_record="weighted"),
    "clusters": dict(timestep_clusters=4, cluster_lr_schedule="per_cluster"),
    "ks_sigma_logit_normal": dict(timestep_sampling="sigma", weighting_scheme="logit_normal", discrete_flow_shift=3.1582),
    "shift": dict(timestep_sampling="shift", discrete_flow_shift=3.1582),
    "flux_shift_stratified": dict(timestep_sampling="flux_shift", stratified_timesteps=True),
    "mode": dict(weighting_scheme="mode"),
    "dynamic": dict(timestep_sampling="logit_normal_dynamic"),
    "beta_timestep_shift": dict(timestep_sampling="beta", beta_alpha=2, beta_beta=2, timestep_shift=3.0),
    "noise": dict(noise_offset=0.05, ip_noise_gamma=0.1),
    "multires": dict(multires_noise_iterations=3),
    "sigma_scaled": dict(model_prediction_type="sigma_scaled"),
    "additive": dict(model_prediction_type="additive"),
}


@pytest.fixture(scope="module")
def baseline(models, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return lora_tensors(run_inprocess("flux", flux_argv(models["dev"], dataset, str(out), **_fast())))


def _fast() -> dict:
    return dict(network_train_unet_only=True, cache_latents=True, cache_text_encoder_outputs=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_every_loss_option_trains_flux_through_the_engine(models, dataset, tmp_path, baseline, name):
    """Each option trains 2 steps; the LoRA moved away from its zero init, and away from the plain l2 / uniform
    run's (the option reached the loss or the timesteps); the file's metadata names it. ew is the exception that
    proves the path: it blends toward d² by the loss map's importance, which is 0 in bins the map has not seen,
    so over 2 steps it must equal the l2 run bit for bit."""
    from safetensors import safe_open

    path = run_inprocess("flux", flux_argv(models["dev"], dataset, str(tmp_path), **_fast(), **LOSS_OPTIONS[name]))
    sd = lora_tensors(path)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in sd.values()) and any(v.abs().max() > 0 for v in ups)
    changed = any(not torch.equal(sd[k], baseline[k]) for k in sd)
    assert changed != (name == "ew"), "the option changed nothing" if name != "ew" else "ew differs from l2"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"  # KS's name for a dev LoRA
    assert metadata["ss_loss_type"] == LOSS_OPTIONS[name].get("loss_type", "l2")
    assert metadata["ss_prediction_type"] == ("flow_x0" if name == "sigma_scaled" else "flow")
    assert (metadata["ss_model_type"], metadata["ss_guidance_scale"]) == ("flux", "1.0")
    assert metadata["ss_model_prediction_type"] == LOSS_OPTIONS[name].get("model_prediction_type", "raw")


def test_ks_sigma_sampling_is_the_scheme_sampler_shifted(tmp_path):
    """--timestep_sampling sigma = KS Flux's default: --weighting_scheme's sampler, σ shifted by
    --discrete_flow_shift."""
    from library import train_util
    from library.loss_config import LossConfig

    args = train_util.parse_args("flux", ["--timestep_sampling", "sigma", "--discrete_flow_shift", "3.1582"])
    cfg = LossConfig.from_args(args, "flux", "flow")
    assert (cfg.timestep_sampling, cfg.timestep_shift) == ("uniform", 3.1582)
    args = train_util.parse_args("flux", ["--timestep_sampling", "sigma", "--weighting_scheme", "logit_normal"])
    cfg = LossConfig.from_args(args, "flux", "flow")
    assert (cfg.timestep_sampling, cfg.timestep_shift) == ("logit_normal", 3.0)


# ----------------------------------------------------------------------------------------------
# KS recipes, unchanged but for paths
# ----------------------------------------------------------------------------------------------
KS_FLUX_RECIPE = """
pretrained_model_name_or_path = "{model}"
clip_l = "{clip_l}"
t5xxl = "{t5xxl}"
ae = "{ae}"
model_config = "{config}"
dataset_config = "{dataset}"
output_dir = "{out}"
output_name = "my_flux_lora"
save_model_as = "safetensors"
network_module = "networks.lora_flux"
network_dim = 16
network_alpha = 1
learning_rate = 1e-4
optimizer_type = "AdamW8bit"
lr_scheduler = "constant"
sdpa = true
max_train_epochs = 2
save_every_n_epochs = 1
mixed_precision = "bf16"
gradient_checkpointing = true
guidance_scale = 1.0
timestep_sampling = "flux_shift"
model_prediction_type = "raw"
blocks_to_swap = 18
cache_text_encoder_outputs = true
cache_latents = true
"""

KS_DATASET = """
[general]
flip_aug = false
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
batch_size = 2
enable_bucket = true
resolution = [64, 64]
min_bucket_reso = 64

  [[datasets.subsets]]
  image_dir = "{images}"
  num_repeats = 1
"""


@pytest.mark.slow
def test_ks_flux_recipe_trains_unchanged_but_for_paths(models, dataset, tmp_path):
    """KS docs/flux_train_network.md's command (as a --config_file; epochs 10 -> 2, --model_config because the tiny
    model is not the shipped full-size architecture, mixed_precision fp16 -> bf16: CPU has no fp16 autocast, and
    fp16 without a GPU is refused) with the docs' dataset TOML (resolution 1024 -> 64 with
    min_bucket_reso 64 to stay tiny; flip_aug false: KS caches flipped latents too, our data layer refuses
    flip_aug with --cache_latents)."""
    paths = models["dev"]
    (tmp_path / "dataset.toml").write_text(KS_DATASET.format(images=os.path.join(dataset, "2_sks photo")))
    (tmp_path / "run.toml").write_text(KS_FLUX_RECIPE.format(
        model=paths["single_file"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"], ae=paths["ae"],
        config=paths["model_config"], dataset=tmp_path / "dataset.toml", out=tmp_path / "out"))
    from accelerate.state import AcceleratorState, GradientState

    def reset():  # accelerate's state is process-wide: the recipe's bf16 accelerator neither inherits nor leaks
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    try:
        final = run_inprocess("flux", ["--config_file", str(tmp_path / "run.toml")])
    finally:
        reset()
    assert os.path.basename(final) == "my_flux_lora.safetensors"
    assert os.path.isfile(tmp_path / "out" / "my_flux_lora-000001.safetensors")
    sd = lora_tensors(final)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (16, 32)
    assert any(k.startswith("lora_te1_") for k in sd)    # the recipe trains CLIP-L too (T5 from the cache)
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.startswith("lora_te1_") and "lora_up" in k)


@pytest.mark.slow
def test_ks_chroma_recipe_trains_with_flux_train_network(models, dataset, tmp_path):
    """KS's Chroma command: flux_train_network.py --model_type chroma, no --clip_l, guidance 0, sigmoid."""
    paths = models["chroma"]
    argv = ["--pretrained_model_name_or_path", paths["single_file"], "--model_type", "chroma",
            "--t5xxl", paths["t5xxl"], "--ae", paths["ae"], "--model_config", paths["model_config"],
            "--train_data_dir", dataset, "--caption_extension", ".txt", "--resolution", "64",
            "--output_dir", str(tmp_path), "--output_name", "my_chroma_lora", "--guidance_scale", "0.0",
            "--timestep_sampling", "sigmoid", "--apply_t5_attn_mask", "--network_module", "networks.lora_flux",
            "--max_train_steps", "2", "--t5xxl_max_token_length", str(T5_LEN)]
    sd = lora_tensors(run_inprocess("flux", argv))
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in sd)
    assert not any("mod_lin" in k for k in sd) and not any(k.startswith("lora_te") for k in sd)


def test_refusals_happen_before_any_model_loads(tmp_path, dataset):
    from library.errors import UserError

    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", dataset,
            "--output_dir", str(tmp_path)]
    for extra, match in ((["--split_mode"], "--split_mode"), (["--model_type", "chroma", "--clip_l", "x"], "--clip_l"),
                         (["--v_parameterization"], "--v_parameterization"),
                         (["--timestep_sampling", "sigma", "--timestep_shift", "2"], "--timestep_shift")):
        os.makedirs(tmp_path / "transformer", exist_ok=True)   # a folder that is not a loadable model
        with pytest.raises(UserError, match=match):
            run_inprocess("flux", argv + extra)


# ----------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------
def test_show_timesteps_draws_the_resolution_dependent_flux_shift(tmp_path):
    """flux_shift at 256 px (256 tokens: μ = 0.5) and 1024 px (4096 tokens: μ = 1.15): the median σ of the draws
    is S_{e^μ}(1/2) = e^μ/(1 + e^μ), and a PNG is drawn."""
    import math

    from tools import show_timesteps

    medians = {}
    for resolution in (256, 1024):
        out = tmp_path / f"s{resolution}.csv"
        assert show_timesteps.main(["--model_family", "flux", "--timestep_sampling", "flux_shift", "--resolution",
                                    str(resolution), "--num_samples", "4000", "--samples_out", str(out)]) == 0
        lines = out.read_text().splitlines()
        column = lines[0].split(",").index("sigma")
        medians[resolution] = statistics.median(float(line.split(",")[column]) for line in lines[1:])
    for resolution, mu in ((256, 0.5), (1024, 1.15)):
        assert abs(medians[resolution] - math.exp(mu) / (1 + math.exp(mu))) < 0.02, medians
    assert show_timesteps.main(["--model_family", "chroma", "--timestep_sampling", "flux_shift",
                                "--num_samples", "500", "--image_out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_make_tiny_model_writes_a_loadable_model(tmp_path, family):
    from library.families.base import Models
    from library.families import get_family
    from tools.make_tiny_model import main

    single = tmp_path / "bfl" / "model.safetensors"
    assert main(["--family", family, "--out", str(tmp_path / "d"), "--single_file", str(single)]) == 0
    entry = get_family(family)
    for source in (str(tmp_path / "d"), str(single)):
        extra = {} if source.endswith("d") else dict(model_config=str(tmp_path / "bfl" / "model_config"),
                                                      t5xxl=str(tmp_path / "bfl" / "t5xxl.safetensors"),
                                                      ae=str(tmp_path / "bfl" / "ae.safetensors"))
        if family == "flux" and extra:
            extra["clip_l"] = str(tmp_path / "bfl" / "clip_l.safetensors")
        loaded = entry.adapter().load(entry.options_class(source, **extra))
        assert isinstance(loaded, Models) and loaded.vae.config.latent_channels == 16


@pytest.mark.slow
def test_two_processes_train_identical_flux_weights(models, dataset, tmp_path):
    """accelerate launch --num_processes 2 flux_train_network.py: both ranks end with the same LoRA (CLIP-L and
    transformer) and loss map, with flux_shift, the loss-map sampler and the clustered optimizer."""
    import subprocess
    import sys

    from tests.train_helpers import ROOT

    argv = flux_argv(models["dev"], dataset, str(tmp_path / "out"), steps=2, timestep_sampling="loss_map",
                     timestep_clusters=2, cache_latents=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "flux_train_network.py"), *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes: max difference 0" in result.stdout, result.stdout[-2000:]
    weights = lora_tensors(str(tmp_path / "out" / "lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith("lora_te1_") and "lora_up" in k)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_samples_and_validation_loss(models, tmp_path, capsys, variant):
    """--sample_prompts renders with FluxPipeline / ChromaPipeline (LoRA active) and --validation_split gives a
    finite validation loss, from a partial text-encoder cache on Flux (CLIP-L trains, T5 cached)."""
    import glob
    import math

    data = tmp_path / "data"
    make_images(str(data / "2_sks photo"), 4, size=(64, 64))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks photo --n blurry --w 64 --h 64 --s 2 --l 2.0 --d 7\n")
    script = "chroma" if variant == "chroma" else "flux"
    path = run_inprocess(script, flux_argv(models[variant], str(data), str(tmp_path / "out"), steps=2,
                                           sample_prompts=str(prompts), sample_every_n_steps=2,
                                           validation_split=0.5, validate_every_n_steps=1, validation_timesteps=2,
                                           cache_text_encoder_outputs=True, cache_latents=True))
    images = glob.glob(str(tmp_path / "out" / "sample" / "*.png"))
    assert len(images) == 1 and "_7" in os.path.basename(images[0])
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == ("chroma" if variant == "chroma" else "flux1")
    assert metadata["modelspec.architecture"] == ("chroma/lora" if variant == "chroma" else "flux-1-dev/lora")
    losses = [float(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()
              if "validation loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)

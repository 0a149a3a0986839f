"""train_network.py end to end on a tiny SD1.5: files diffusers loads, loss that falls, v-prediction,
zero terminal SNR, resume equal to an uninterrupted run, config files, and clear errors for bad input."""
import os

import pytest
import torch

from tests.train_helpers import (base_argv, lora_tensors, make_images, run_inprocess, run_script, save_tiny_sd15)


@pytest.fixture(scope="session")
def sd15_v(tmp_path_factory):
    return save_tiny_sd15(str(tmp_path_factory.mktemp("models") / "sd15v"), v_prediction=True)


def test_trained_lora_loads_in_diffusers_and_changes_the_image(sd15, dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path), steps=3))
    sd = lora_tensors(path)
    modules = {k.split(".")[0] for k in sd}
    assert all(m.startswith(("lora_unet_", "lora_te_")) for m in modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert all(f"{m}.alpha" in sd and f"{m}.lora_down.weight" in sd and f"{m}.lora_up.weight" in sd for m in modules)

    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    kw = dict(prompt="sks photo", num_inference_steps=2, height=64, width=64, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(path, adapter_name="trained")
    # every module of the file became a PEFT layer in the UNet or the text encoder
    peft_layers = [n for model in (pipe.unet, pipe.text_encoder) for n, m in model.named_modules()
                   if hasattr(m, "lora_A") and "trained" in getattr(m, "lora_A", {})]
    assert len(peft_layers) == len(modules)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-4


def _fixed_timestep_loss(model_dir, image_dir, lora_path, prediction, timesteps=(50, 250, 500, 750, 950)):
    """Mean MSE of the denoiser on the training images at fixed timesteps and fixed noise."""
    from PIL import Image
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from networks import lora

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    if lora_path:
        network, _ = lora.create_network_from_weights(1.0, lora_path, pipe.vae, pipe.text_encoder, pipe.unet)
        network.apply_to(pipe.text_encoder, pipe.unet, True, True)
        network.load_weights(lora_path)
        network.eval()
    images = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir) if f.endswith(".png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                     .permute(2, 0, 1) for p in images])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(["sks photo"] * len(images), padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        ac = pipe.scheduler.alphas_cumprod
        losses = []
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g)
            a = ac[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
            pred = pipe.unet(noisy, torch.full((len(images),), t), cond).sample
            losses.append(torch.mean((pred - target) ** 2).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_at_fixed_timesteps_falls(sd15, sd15_v, tmp_path, prediction):
    model = sd15 if prediction == "epsilon" else sd15_v
    make_images(str(tmp_path / "data" / "30_sks photo"), 1)
    extra = {"v_parameterization": prediction == "v_prediction", "network_args": ["conv_dim=4", "conv_alpha=4"],
             "network_train_unet_only": True, "train_batch_size": 1}
    argv = base_argv(model, str(tmp_path / "data"), str(tmp_path / "out"), steps=30, **extra)
    argv[argv.index("--learning_rate") + 1] = "3e-3"
    path = run_inprocess("sd1", argv)
    image_dir = str(tmp_path / "data" / "30_sks photo")
    before = _fixed_timestep_loss(model, image_dir, None, prediction)
    after = _fixed_timestep_loss(model, image_dir, path, prediction)
    assert after < 0.85 * before, (before, after)


def test_zero_terminal_snr_losses_finite_at_every_timestep(sd15_v, dataset, tmp_path):
    """v-prediction with zero terminal SNR and min-SNR weighting: t = 999 has SNR 0 and must stay finite."""
    from library.engine import LossEngine
    from library.loss_config import LossConfig
    from library import train_util
    from library.families import get_adapter
    from library.families.sd1 import SD1Options

    args = train_util.parse_args("sd1", ["--v_parameterization", "--zero_terminal_snr", "--min_snr_gamma", "5",
                                         "--debiased_estimation_loss", "--loss_type", "huber"])
    cfg = LossConfig.from_args(args, "sd1", "v_prediction")
    adapter = get_adapter("sd1")
    models = adapter.load(SD1Options(pretrained_model_name_or_path=sd15_v, v_parameterization=True,
                                     zero_terminal_snr=True))
    engine = LossEngine(cfg, "ddpm", "v_prediction", models.alphas_cumprod, seed=0, rank=0, world_size=1,
                        max_train_steps=10, zero_terminal_snr=True)
    latents = torch.randn(1000, 4, 8, 8)
    levels = engine.grid_levels()  # t = 0..999
    assert levels.snr[-1] == 0
    noise = torch.randn_like(latents)
    noisy, target = engine.make_inputs(latents, noise, levels)
    pred = target + 0.1 * torch.randn_like(target)
    pred.requires_grad_(True)
    result = engine.loss(pred, target, levels, step=0, noisy=noisy)
    assert torch.isfinite(result.raw).all() and torch.isfinite(result.weighted).all()
    result.loss.backward()
    assert torch.isfinite(pred.grad).all()

    # and a real run trains with these flags
    path = run_inprocess("sd1", base_argv(sd15_v, dataset, str(tmp_path), steps=2, v_parameterization=True,
                                          zero_terminal_snr=True, min_snr_gamma=5))
    assert all(torch.isfinite(t).all() for t in lora_tensors(path).values())


RESUME_CASES = {
    "plain": dict(timestep_sampling="logit_normal", loss_type="huber", network_dropout=0.1),
    "clusters_and_loss_map": dict(timestep_sampling="loss_map", timestep_clusters=3, loss_map_offset=True,
                                  optimizer_type="AdamW8bit", lr_scheduler="cosine"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_equals_uninterrupted_run(sd15, dataset, tmp_path, monkeypatch, case):
    """4 batches per epoch, state saved at step 5 (inside epoch 2), resumed to step 10: bit-identical LoRA,
    and the resumed run really ran only the last 5 steps."""
    from library import training_loop
    common = dict(save_every_n_steps=5, save_state=True, train_batch_size=1, **RESUME_CASES[case])
    full = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "full"), steps=10, **common))
    state = str(tmp_path / "full" / "lora-step00000005-state")
    assert os.path.isdir(state)
    calls = []
    real = training_loop._forward_backward
    monkeypatch.setattr(training_loop, "_forward_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "resumed"), steps=10, resume=state,
                                             **common))
    assert len(calls) == 5
    if case == "clusters_and_loss_map":
        from safetensors.torch import load_file
        saved_map = load_file(os.path.join(state, "loss_map.safetensors"))["loss_map"]
        assert saved_map.shape == (1000,) and not torch.all(saved_map == 1.0)
        final_maps = [load_file(str(tmp_path / run / "lora-state" / "loss_map.safetensors"))["loss_map"]
                      for run in ("full", "resumed")]
        assert torch.equal(*final_maps)
        states = [torch.load(str(tmp_path / run / "lora-state" / "optimizer.pt"), weights_only=True)
                  for run in ("full", "resumed")]
        assert len(states[0]["clusters"]) == 3
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_files_train_like_the_command_line(sd15, dataset, tmp_path):
    (tmp_path / "run.toml").write_text(f"""
[model]
pretrained_model_name_or_path = "{sd15}"
[training]
output_dir = "{tmp_path / 'out'}"
output_name = "fromtoml"
max_train_steps = 2
learning_rate = 1e-3
seed = 1
[network]
network_dim = 4
network_alpha = 2
""")
    (tmp_path / "data.toml").write_text(f"""
[general]
caption_extension = ".txt"
resolution = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{dataset}/2_sks photo"
  num_repeats = 2
""")
    path = run_inprocess("sd1", ["--config_file", str(tmp_path / "run.toml"), "--dataset_config",
                                 str(tmp_path / "data.toml")])
    assert path.endswith("fromtoml.safetensors") and os.path.isfile(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "4" and md["ss_loss_type"] == "l2" and "sshs_model_hash" in md
    assert md["ss_steps"] == "2"


def _bad_run(argv, tmp_path):
    result = run_script("train_network.py", argv)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr


@pytest.mark.slow
def test_user_errors_name_the_problem(sd15, tmp_path):
    out = str(tmp_path / "out")
    # missing folder
    err = _bad_run(base_argv(sd15, str(tmp_path / "nope"), out), tmp_path)
    assert "nope" in err
    # empty dataset (no '<repeats>_<tokens>' folder with images)
    (tmp_path / "empty" / "1_x").mkdir(parents=True)
    err = _bad_run(base_argv(sd15, str(tmp_path / "empty"), out), tmp_path)
    assert "1_x" in err or "empty" in err
    # non-UTF-8 caption
    make_images(str(tmp_path / "latin" / "1_x"), 1)
    (tmp_path / "latin" / "1_x" / "img00.txt").write_bytes("caf\xe9 photo".encode("latin-1"))
    err = _bad_run(base_argv(sd15, str(tmp_path / "latin"), out), tmp_path)
    assert "img00.txt" in err
    # unknown TOML key, with the closest valid key
    (tmp_path / "run.toml").write_text("learning_rat = 1e-4\n")
    err = _bad_run(["--config_file", str(tmp_path / "run.toml")], tmp_path)
    assert "learning_rat" in err and "learning_rate" in err
    # wrong type in --config_file
    (tmp_path / "run2.toml").write_text("max_train_steps = 'many'\n")
    err = _bad_run(["--config_file", str(tmp_path / "run2.toml")], tmp_path)
    assert "max_train_steps" in err


@pytest.mark.slow
def test_truncated_image_is_named(sd15, tmp_path):
    folder = tmp_path / "trunc" / "1_x"
    make_images(str(folder), 1)
    data = (folder / "img00.png").read_bytes()
    (folder / "img00.png").write_bytes(data[: len(data) // 2])
    result = run_script("train_network.py", base_argv(sd15, str(tmp_path / "trunc"), str(tmp_path / "out")))
    assert "img00.png" in result.stderr and "Traceback" not in result.stderr


def test_intermediate_saves_follow_ks_names_and_pruning(sd15, dataset, tmp_path):
    """4 batches an epoch, 10 steps: step saves every 2 (the last step too) keeping the last 4 steps' worth (KS:
    at step 10 the saves up to 10 - 4 - 1 rounded down to 2, i.e. 4, go), epoch saves every epoch but the last,
    keeping the last one; KS file names."""
    run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path), steps=10, train_batch_size=1, save_every_n_steps=2,
                                   save_last_n_steps=4, save_every_n_epochs=1, save_last_n_epochs=1))
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert files == sorted(["lora-000002.safetensors", "lora-step00000006.safetensors",
                            "lora-step00000008.safetensors", "lora-step00000010.safetensors", "lora.safetensors"])


@pytest.mark.slow
def test_ctrl_c_saves_lora_and_state(sd15, dataset, tmp_path):
    import signal
    import subprocess
    import time
    from tests.train_helpers import PYTHON, ROOT

    argv = base_argv(sd15, dataset, str(tmp_path), steps=100000, train_batch_size=1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "train_network.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "loss=" not in seen:  # wait until steps are running
        seen += proc.stderr.read(64)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    saved = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    states = [f for f in os.listdir(tmp_path) if f.endswith("-state")]
    assert len(saved) == 1 and len(states) == 1, os.listdir(tmp_path)
    assert "--resume" in out and states[0] in out
    step = int(states[0].split("-step")[1].split("-")[0])
    assert step >= 1
    import json
    with open(os.path.join(tmp_path, states[0], "train_state.json")) as f:
        assert json.load(f)["step"] == step


@pytest.mark.parametrize("dim_from_weights", [False, True])
def test_network_weights_start_from_an_existing_lora(sd15, dataset, tmp_path, dim_from_weights):
    first = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "a"), steps=2,
                                           network_args=["conv_dim=2", "conv_alpha=1"]))
    argv = base_argv(sd15, dataset, str(tmp_path / "b"), steps=1, network_weights=first,
                     dim_from_weights=dim_from_weights)
    argv[argv.index("--learning_rate") + 1] = "1e-12"  # one step that cannot move the weights visibly
    if not dim_from_weights:
        argv += ["--network_args", "conv_dim=2", "conv_alpha=1"]
    second = run_inprocess("sd1", argv)
    a, b = lora_tensors(first), lora_tensors(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("v2", [False, True])
def test_single_file_trains_the_same_lora_as_the_diffusers_folder(dataset, tmp_path, v2):
    """The same tiny model as an original-layout .safetensors (with --model_config) and as a diffusers folder:
    identical LoRA after training (SD2 single files carry the OpenCLIP text encoder layout)."""
    from tests.fixtures.tiny import tiny_sd1_paths

    paths = tiny_sd1_paths(v2=v2, v_prediction=v2)
    extra = dict(v2=v2, v_parameterization=v2)
    from_folder = run_inprocess("sd1", base_argv(paths["diffusers"], dataset, str(tmp_path / "a"), steps=2, **extra))
    from_file = run_inprocess("sd1", base_argv(paths["single_file"], dataset, str(tmp_path / "b"), steps=2,
                                               model_config=paths["model_config"], **extra))
    a, b = lora_tensors(from_folder), lora_tensors(from_file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

"""Issue 14: the loss-map range fix in the engine, masked loss, learned weighting, loss-map files and their flags,
with oracle values, and a resumed run with --loss_weighting learned and --masked_loss equal to the uninterrupted
one."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.engine import LossEngine
from library.errors import UserError
from library.learned_weighting import LearnedWeighting, learned_objective
from library.loss_config import LossConfig
from library import checkpointing
from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess

KIND = {"sd1": "ddpm", "sd3": "flow"}


def engine(family="sd1", prediction="epsilon", steps=100, **options) -> LossEngine:
    cfg = LossConfig(family=family, prediction_type=prediction, **options)
    return LossEngine(cfg, KIND[family], prediction, None, seed=3, rank=0, world_size=1, max_train_steps=steps)


# ------------------------------------------------------------------------------------------------------------ range
@pytest.mark.parametrize("family, prediction", [("sd1", "epsilon"), ("sd3", "flow")])
def test_engine_offset_is_one_for_a_constant_loss_in_a_timestep_range(family, prediction):
    """The issue's case: constant loss 0.1 on t in [300, 700): weight exactly 1 at any step (was 0.16 / 0.58)."""
    e = engine(family, prediction, loss_map_offset=True, min_timestep=300, max_timestep=700)
    for step in range(60):
        levels = e.sample_levels(step, 64)
        e.loss_map.update(levels.bins, torch.full((64,), 0.1))
    assert bool(e.trained_bins[300:700].all()) and not bool(e.trained_bins[:300].any())
    assert float(e.loss_map.values[:290].min()) == 1.0  # untouched outside
    levels = e.sample_levels(999, 256)
    for step in (0, 50):
        torch.testing.assert_close(e.timestep_weights(levels, step).float(), torch.ones(256), rtol=1e-5, atol=0)


def test_loss_map_init_starts_from_a_file(tmp_path):
    from library.loss_map import LossMap

    saved = LossMap(1000)
    saved.update(torch.tensor([100, 800]), torch.tensor([0.05, 2.0]))
    saved.to_csv(str(tmp_path / "map.csv"))
    e = engine(timestep_sampling="loss_map", loss_map_init=str(tmp_path / "map.csv"))
    torch.testing.assert_close(e.loss_map.values, saved.values, rtol=1e-8, atol=0)


# ------------------------------------------------------------------------------------------------------------ masks
def test_masked_loss_is_the_hand_computed_masked_mean():
    """l2, one sample, one channel, latent 2×2, d = (1, 2; 3, 4). A 4×4 image mask whose 2×2 blocks average to
    (1, 0.5; 0, 0.25) (area resize). area: Σ d²·m / Σ m = (1 + 2 + 0 + 4)/1.75 = 4; none (KS): mean(d²·m) = 7/4."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float32)[None, None]
    levels = engine().sample_levels(0, 1)
    area = engine().loss(pred, target, levels, 0, mask=mask)
    assert float(area.raw) == pytest.approx(4.0, rel=1e-6) and float(area.loss) == pytest.approx(4.0, rel=1e-6)
    ks = engine(masked_loss_normalization="none").loss(pred, target, levels, 0, mask=mask)
    assert float(ks.raw) == pytest.approx(7 / 4, rel=1e-6)
    assert float(engine().loss(pred, target, levels, 0).raw) == pytest.approx(7.5)  # no mask: plain mean


def _rgba(path, size=(64, 64), alpha=None):
    rgb = np.full((size[1], size[0], 3), 120, dtype=np.uint8)
    if alpha is None:
        Image.fromarray(rgb).save(path)
    else:
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


@pytest.fixture()
def masked_data(tmp_path):
    """Two 64×64 images with masks in a conditioning folder: left half 255, right half 0 (red channel)."""
    images = tmp_path / "img" / "1_sks"
    make_images(str(images), 2, caption="sks")
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((64, 64, 3), dtype=np.uint8)
    left[:, :32, 0] = 255
    for i in range(2):
        Image.fromarray(left).save(masks / f"img{i:02d}.jpg" if i else masks / f"img{i:02d}.png")
    return str(tmp_path / "img"), str(masks)


def _group(data, **options):
    from library.data import DatasetOptions, build_dataset_group

    return build_dataset_group(DatasetOptions(train_data_dir=data, resolution="64", caption_extension=".txt",
                                              **options))


def test_masks_follow_the_image_and_are_cached_with_the_latents(masked_data):
    data, masks = masked_data
    group = _group(data, conditioning_data_dir=masks, masked_loss=True)
    batch = group.load_batch([0, 1], 1, 0)
    assert batch["masks"].shape == (2, 1, 64, 64)
    # one mask is a JPEG (any image format works): allow its compression error
    assert float(batch["masks"][:, :, :, :30].min()) > 0.98 and float(batch["masks"][:, :, :, 34:].max()) < 0.02
    encode = lambda images: torch.nn.functional.avg_pool2d(images, 8)[:, :3]  # noqa: E731  a "VAE": 8× smaller
    group.cache_latents(encode, to_disk=False, cache_key="k")
    cached = group.load_batch([0, 1], 1, 0)
    assert cached["images"] is None and cached["masks"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(cached["masks"], torch.nn.functional.interpolate(batch["masks"], size=(8, 8),
                                                                                mode="area"))


def test_disk_cache_keeps_the_mask(masked_data, tmp_path):
    data, masks = masked_data
    group = _group(data, conditioning_data_dir=masks, masked_loss=True)
    encode = lambda images: torch.nn.functional.avg_pool2d(images, 8)[:, :3]  # noqa: E731
    group.cache_latents(encode, to_disk=True, cache_key="k")
    batch = group.load_batch([0], 1, 0)
    assert batch["masks"].shape == (1, 1, 8, 8) and float(batch["masks"][0, 0, 0, 0]) > 0.98
    again = _group(data, conditioning_data_dir=masks, masked_loss=True)
    assert again.cache_latents(encode, to_disk=True, cache_key="k").reused == 2


def test_alpha_mask_and_flag_rules(masked_data, tmp_path):
    data, masks = masked_data
    alpha_dir = tmp_path / "alpha" / "1_sks"
    alpha_dir.mkdir(parents=True)
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:32] = 255
    _rgba(alpha_dir / "a.png", alpha=alpha)
    _rgba(alpha_dir / "b.png")  # no alpha channel: ones (KS)
    group = _group(str(tmp_path / "alpha"), alpha_mask=True)
    m = group.load_batch([0, 1], 1, 0)["masks"]
    assert float(m[0, 0, :30].min()) == 1.0 and float(m[0, 0, 34:].max()) == 0.0 and float(m[1].min()) == 1.0
    with pytest.raises(UserError, match="conditioning_data_dir: .*--masked_loss"):
        _group(data, conditioning_data_dir=masks)
    with pytest.raises(UserError, match="--masked_loss: no subset has masks"):
        _group(data, masked_loss=True)
    os.remove(os.path.join(masks, "img01.jpg"))
    with pytest.raises(UserError, match="1 image\\(s\\) have no mask.*img01.png"):
        _group(data, conditioning_data_dir=masks, masked_loss=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(os.path.join(masks, "img01.png"))
    with pytest.raises(UserError, match="is 32x32 but its image is 64x64"):
        _group(data, conditioning_data_dir=masks, masked_loss=True)


def test_dataset_toml_mask_keys(masked_data, tmp_path):
    from library.data import DatasetOptions, build_dataset_group

    data, masks = masked_data
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\n[[datasets]]\n[[datasets.subsets]]\n'
                    f'image_dir = "{data}/1_sks"\nconditioning_data_dir = "{masks}"\n', encoding="utf-8")
    group = build_dataset_group(DatasetOptions(dataset_config=str(toml), masked_loss=True))
    assert all(item.mask_source.startswith(masks) for item in group.items)


# ------------------------------------------------------------------------------------------------------------ learned
def _train_u(per_bin_loss, noisy: bool, steps: tuple[int, int], batch: int = 128):
    """Train u alone on a stationary synthetic loss: t uniform, loss per_bin_loss(t), times E ~ Exp(1) (mean 1)
    when ``noisy``; Adam at lr 0.02, then 0.002 (the noise floor of a constant lr is ~lr·√steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: threads only contend
    try:
        weighting = LearnedWeighting(0.02)
        g = torch.Generator().manual_seed(1)
        for step in range(sum(steps)):
            if step == steps[0]:
                for group in weighting.optimizer.param_groups:
                    group["lr"] = 0.002
            t = torch.randint(0, 1000, (batch,), generator=g)
            loss = per_bin_loss(t.float())
            if noisy:
                loss = loss * torch.empty(batch).exponential_(generator=g)
            learned_objective(loss, weighting(t / 1000)).mean().backward()
            weighting.step()
        grid = torch.arange(1000).double()
        return weighting.curve(grid / 1000) - torch.log(per_bin_loss(grid))
    finally:
        torch.set_num_threads(threads)


def per_bin_loss(t):
    return 0.02 + 3.0 * (t / 1000.0) ** 2  # two orders of magnitude from t = 0 to 999


def test_learned_u_converges_to_the_log_of_the_per_bin_loss():
    """Minimising L/e^u + u at each noise level gives u = log L: on a stationary per-bin loss u(t) matches
    log L(t) to 0.05 at every t after 900 steps."""
    error = _train_u(per_bin_loss, noisy=False, steps=(600, 300))
    assert float(error.abs().max()) < 0.05, float(error.abs().max())


@pytest.mark.slow
def test_learned_u_converges_to_the_log_of_the_expected_loss_under_noise():
    """The same with losses L(t)·E, E ~ Exp(1) (as noisy as a real per-sample loss): u → log E[L | t]."""
    error = _train_u(per_bin_loss, noisy=True, steps=(3000, 3000)).abs()
    assert float(error.mean()) < 0.05 and float(error.max()) < 0.2, (float(error.mean()), float(error.max()))


def test_learned_objective_in_the_engine_and_state():
    e = engine(loss_weighting="learned", min_snr_gamma=5.0)
    levels = e.sample_levels(0, 4)
    pred = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.zeros(4, 4, 8, 8)
    with torch.no_grad():
        e.learned.net.out.bias.fill_(0.5)  # u = 0.5 everywhere (out.weight is 0 at the start)
    result = e.loss(pred, target, levels, 0)
    plain = engine(min_snr_gamma=5.0).loss(pred, target, levels, 0)
    u = e.learned(e.noise_fraction(levels))
    assert torch.allclose(u, torch.full((4,), 0.5), atol=1e-3)
    torch.testing.assert_close(result.loss, (plain.weighted * torch.exp(-u) + u).mean())
    result.loss.backward()
    assert e.learned.net.out.bias.grad is not None and float(e.learned.net.out.bias.grad.abs()) > 0
    e.learned.step()
    state = e.state_dict()["learned_weighting"]
    other = engine(loss_weighting="learned")
    other.load_state_dict({"learned_weighting": state})
    fraction = e.noise_fraction(levels)
    torch.testing.assert_close(other.learned.curve(fraction), e.learned.curve(fraction))
    assert other.learned.optimizer.state_dict()["state"][0]["step"] == 1


def test_learned_weighting_is_bounded_and_finite_at_zero_snr():
    net = LearnedWeighting().net
    with torch.no_grad():
        net.out.bias.fill_(-50.0)  # a loss that tends to 0 would drive u down
    u = net(torch.tensor([0.0, 0.5, 1.0])).detach()
    assert torch.isfinite(u).all() and float(torch.exp(-u).max()) <= 1000.0 * (1 + 1e-6)


def test_learned_weighting_file_round_trip(tmp_path):
    w = LearnedWeighting()
    with torch.no_grad():
        w.net.out.weight.normal_(generator=torch.Generator().manual_seed(2))
    w.save_file(str(tmp_path / "lw.safetensors"))
    x = torch.linspace(0, 1, 7)
    torch.testing.assert_close(LearnedWeighting.from_file(str(tmp_path / "lw.safetensors")).curve(x), w.curve(x))
    (tmp_path / "x.safetensors").write_bytes(b"nonsense")
    with pytest.raises(UserError, match="--learned_weights: cannot read"):
        LearnedWeighting.from_file(str(tmp_path / "x.safetensors"))


# ------------------------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("argv, message", [
    (["--snr_weighting", "snr", "--min_snr_gamma", "5"], "--snr_weighting snr and --min_snr_gamma"),
    (["--max_snr_gamma", "2"], "--max_snr_gamma: has no effect without --snr_weighting max_snr"),
    (["--loss_weighting_lr", "0.1"], "--loss_weighting_lr: has no effect without --loss_weighting learned"),
    (["--clustered_mse_mode", "kmeans"], "--clustered_mse_mode: has no effect with --loss_type l2"),
    (["--loss_map_init", "/nonexistent.csv", "--loss_map_offset"], "--loss_map_init: /nonexistent.csv does not exist"),
    (["--loss_weighting", "learned", "--loss_weighting_lr", "0"], "--loss_weighting_lr: 0.0 is not a finite number"),
])
def test_invalid_combinations_are_refused(argv, message):
    import argparse
    from library import loss_config

    parser = argparse.ArgumentParser()
    loss_config.add_arguments(parser)
    with pytest.raises(UserError, match=message.replace("(", "\\(")):
        LossConfig.from_args(parser.parse_args(argv), "sd1", "epsilon")


def test_loss_map_init_needs_a_map(tmp_path):
    import argparse
    from library import loss_config

    (tmp_path / "m.csv").write_text("bin,loss\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    loss_config.add_arguments(parser)
    with pytest.raises(UserError, match="--loss_map_init: has no effect without a loss map"):
        LossConfig.from_args(parser.parse_args(["--loss_map_init", str(tmp_path / "m.csv")]), "sd1", "epsilon")


def test_kmeans_clustered_mse_in_the_engine_equals_mse():
    e = engine(loss_type="clustered_mse", clustered_mse_mode="kmeans")
    e.loss_map.values[500:] = 3.0
    levels = e.sample_levels(0, 4)
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = e.loss(target + 0.3 * target.sin(), target, levels, 0)
    torch.testing.assert_close(result.raw, ((0.3 * target.sin()) ** 2).mean((1, 2, 3)))


# ------------------------------------------------------------------------------------------------------------ e2e
@pytest.mark.slow
def test_resume_with_learned_weighting_and_masked_loss_equals_uninterrupted(sd15, masked_data, tmp_path, monkeypatch):
    """4 steps, state at step 2, resumed to 4: the LoRA, u(σ) and its Adam state are bit-identical; the loss-map,
    learned-weighting and heatmap files are written beside every state and at the end."""
    data, masks = masked_data
    common = dict(save_every_n_steps=2, save_state=True, train_batch_size=1, loss_weighting="learned",
                  masked_loss=True, conditioning_data_dir=masks, loss_map_offset=True, heatmap_every_n_steps=100)
    full = run_inprocess("sd1", base_argv(sd15, data, str(tmp_path / "full"), steps=4, **common))
    state = str(tmp_path / "full" / (checkpointing.step_name("lora", 2) + "-state"))
    for name in ("loss_map.csv", "loss_map.png", "learned_weighting.safetensors", "learned_weighting.png",
                 "loss_heatmap.png"):
        assert os.path.isfile(os.path.join(state, name)), name
        assert os.path.isfile(str(tmp_path / "full" / f"lora-{name}")), name
    resumed = run_inprocess("sd1", base_argv(sd15, data, str(tmp_path / "resumed"), steps=4, resume=state, **common))
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    engines = [torch.load(str(tmp_path / run / "lora-state" / "engine.pt"), weights_only=True)
               for run in ("full", "resumed")]
    for key, value in engines[0]["learned_weighting"]["net"].items():
        assert torch.equal(value, engines[1]["learned_weighting"]["net"][key]), key
    moved = engines[0]["learned_weighting"]["net"]["out.bias"]
    assert float(moved.abs()) > 0  # u really trained
    assert torch.equal(engines[0]["loss_map"]["values"], engines[1]["loss_map"]["values"])


# ------------------------------------------------------------------------------------------------------------ show_timesteps
def _curve_csv(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_show_timesteps_applies_the_map_and_the_learned_weights(tmp_path):
    from library.loss_map import LossMap
    from library.weighting import loss_map_offset_weight
    from tools import show_timesteps

    loss_map = LossMap()
    loss_map.values[:] = torch.linspace(0.5, 2.5, 1000)
    loss_map.to_csv(str(tmp_path / "map.csv"))
    learned = LearnedWeighting()
    with torch.no_grad():
        learned.net.out.bias.fill_(0.7)
    learned.save_file(str(tmp_path / "lw.safetensors"))
    out, image = tmp_path / "c.csv", tmp_path / "t.png"
    argv = ["--model_family", "sd1", "--loss_map_offset", "--loss_type", "ew", "--step", "20", "--max_train_steps",
            "100", "--loss_map", str(tmp_path / "map.csv"), "--learned_weights", str(tmp_path / "lw.safetensors"),
            "--curves_out", str(out), "--image_out", str(image), "--num_samples", "200"]
    assert show_timesteps.main(argv) == 0
    header, rows = _curve_csv(out)
    assert header[-2:] == ["ew_share", "learned_u"]
    weight = torch.tensor([float(r[header.index("loss_weight")]) for r in rows], dtype=torch.float64)
    u = torch.tensor([float(r[header.index("learned_u")]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(u, torch.full((1000,), 0.7, dtype=torch.float64), atol=2e-3, rtol=0)
    offset = loss_map_offset_weight(loss_map.values, torch.arange(1000), 20, 100).double()  # not the flat map's 1
    torch.testing.assert_close(weight, offset * torch.exp(-u), rtol=1e-6, atol=0)
    share = torch.tensor([float(r[header.index("ew_share")]) for r in rows])
    assert float(share[0]) > float(share[999]) > 0  # low map values get more of the ew loss
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_timesteps_names_the_bound(tmp_path, capsys):
    from tools import show_timesteps

    assert show_timesteps.main(["--model_family", "sd1", "--zero_terminal_snr", "--debiased_estimation_loss",
                                "--v_pred_like_loss", "1", "--curves_out", str(tmp_path / "c.csv")]) == 0
    assert "reaches the bound 1000" in capsys.readouterr().out
    header, rows = _curve_csv(tmp_path / "c.csv")
    assert max(float(r[header.index("loss_weight")]) for r in rows) == 1000.0


def test_cached_masks_follow_flips_like_full_size_ones(masked_data):
    """flip_aug with cached latents: the cached (latent-size) mask of a flipped draw is the mirror image, equal to
    the area-resized full-size mask of the same draw."""
    data, masks = masked_data
    plain = _group(data, conditioning_data_dir=masks, masked_loss=True, flip_aug=True)
    cached = _group(data, conditioning_data_dir=masks, masked_loss=True, flip_aug=True)
    cached.cache_latents(lambda images: torch.nn.functional.avg_pool2d(images, 8)[:, :3], to_disk=False,
                         cache_key="k")
    mirrored = 0
    for batch_number in range(8):
        full = plain.load_batch([0, 1], 1, batch_number)["masks"]
        small = cached.load_batch([0, 1], 1, batch_number)["masks"]
        torch.testing.assert_close(small, torch.nn.functional.interpolate(full, size=(8, 8), mode="area"))
        mirrored += int((small[:, 0, :, -1] > 0.5).any())
    assert mirrored > 0  # some draws flipped


@pytest.mark.parametrize("family, prediction", [("sd1", "v_prediction"), ("sd3", "flow"), ("sd3", "flow_x0")])
def test_learned_weighting_with_every_family_and_the_loss_map(family, prediction):
    e = engine(family, prediction, loss_weighting="learned", timestep_sampling="loss_map", loss_map_offset=True,
               loss_map_record="weighted")
    levels = e.sample_levels(0, 4)
    C = 16 if family == "sd3" else 4
    x = torch.randn(4, C, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, target = e.make_inputs(x, e.sample_noise(x, 0), levels)
    pred = (target + 0.1).requires_grad_(True)
    result = e.loss(pred, target, levels, 0, noisy=noisy)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(pred.grad).all()
    assert e.learned.net.out.bias.grad is not None
    e.record(result, levels)
    assert not torch.all(e.loss_map.values == 1.0)


def test_loss_files_and_tensorboard_image(tmp_path):
    from library import loss_outputs
    from library.metrics import LossMetrics

    e = engine(loss_weighting="learned", loss_map_offset=True)
    metrics = LossMetrics(heatmap_every=1000)
    levels = e.sample_levels(0, 8)
    metrics.observe(levels.bins, torch.rand(8))
    assert metrics.add_heatmap_row(3) and metrics.add_heatmap_row(3) and len(metrics.heatmap_steps) == 1
    written = loss_outputs.write_loss_files(e, metrics, str(tmp_path), "run-")
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["run-learned_weighting.png", "run-learned_weighting.safetensors", "run-loss_heatmap.png",
                     "run-loss_map.csv", "run-loss_map.png"]
    image = loss_outputs.learned_weighting_image(e)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert LossMetrics().add_heatmap_row(5) is False  # nothing seen yet: no row


def test_a_bad_loss_map_init_file_is_refused_up_front(tmp_path):
    import argparse
    from library import loss_config

    (tmp_path / "m.csv").write_text("bin,loss\n0,1\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    loss_config.add_arguments(parser)
    args = parser.parse_args(["--loss_map_init", str(tmp_path / "m.csv"), "--loss_map_offset"])
    with pytest.raises(UserError, match="--loss_map_init: .*999 of the 1000 bins have no row"):
        LossConfig.from_args(args, "sd1", "epsilon")

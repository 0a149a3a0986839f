"""LossEngine: reproducible per-rank draws, resume, targets, loss assembly, strata, clusters, loss map."""
import pytest
import torch
from scipy import stats

from library import rng
from library.engine import LossEngine, NoiseLevels
from library.loss_config import LossConfig
from library.losses import huber_c_snr
from library.schedules import rescale_zero_terminal_snr, sd_alphas_cumprod, snr_from_alphas_cumprod
from library.weighting import min_snr_weight

KIND = {"sd1": "ddpm", "sdxl": "ddpm", "sd3": "flow"}


def engine(family="sd1", prediction="epsilon", rank=0, world_size=1, seed=1234, steps=100, **options) -> LossEngine:
    cfg = LossConfig(family=family, prediction_type=prediction, **options)
    return LossEngine(cfg, KIND[family], prediction, None, seed=seed, rank=rank, world_size=world_size,
                      max_train_steps=steps, grad_accum_steps=options.pop("accum", 1) if "accum" in options else 1)


def latents(B=4, C=4, H=8, W=8, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------ rng
def test_stream_seed_is_stable_across_processes():
    # BLAKE2b of the packed key: a pinned value, so a change of hashing (or Python's salted hash) shows up here
    assert rng.stream_seed(42, 7, 1, "timesteps", 2) == 6044983970786882239
    assert rng.uniforms(42, 7, 1, 3, "timesteps", micro_step=2).tolist() == pytest.approx([0.2639, 0.8148, 0.2421], abs=1e-4)


def test_generator_keys():
    draw = lambda *key, **kw: rng.uniforms(*key, n=8, **kw)  # noqa: E731
    base = draw(1, 5, 0)
    assert torch.equal(base, draw(1, 5, 0))
    for other in (draw(2, 5, 0), draw(1, 6, 0), draw(1, 5, 1), draw(1, 5, 0, stream="noise"), draw(1, 5, 0, micro_step=1)):
        assert not torch.equal(base, other)
    assert torch.equal(torch.rand(4, generator=rng.shared_generator(1, 5, "cluster")),
                       torch.rand(4, generator=rng.shared_generator(1, 5, "cluster")))


def test_the_global_rng_is_never_touched():
    e = engine(ip_noise_gamma=0.1, multires_noise_iterations=3, timestep_sampling="logit_normal",
               stratified_timesteps=True, timestep_clusters=4)
    x = latents()
    state = torch.get_rng_state()
    levels = e.sample_levels(3, 4)
    e.make_inputs(x, e.sample_noise(x, 3), levels)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("family, prediction", [("sd1", "epsilon"), ("sd3", "flow")])
def test_same_key_same_draws_and_ranks_differ(family, prediction):
    x = latents()
    a, b = engine(family, prediction, rank=0, world_size=2), engine(family, prediction, rank=0, world_size=2)
    other_rank = engine(family, prediction, rank=1, world_size=2)
    la, lb, lr = a.sample_levels(17, 4, 1), b.sample_levels(17, 4, 1), other_rank.sample_levels(17, 4, 1)
    assert torch.equal(la.u, lb.u) and torch.equal(la.timesteps, lb.timesteps)
    assert torch.equal(a.sample_noise(x, 17, 1), b.sample_noise(x, 17, 1))
    assert not torch.equal(la.u, lr.u)
    assert not torch.equal(a.sample_noise(x, 17, 1), other_rank.sample_noise(x, 17, 1))
    assert not torch.equal(la.u, a.sample_levels(17, 4, 0).u)  # another micro-batch of the same step
    assert not torch.equal(la.u, a.sample_levels(18, 4, 1).u)
    # sample i is draw i of its key: a larger batch starts with the same samples
    assert torch.equal(a.sample_levels(17, 9, 1).u[:4], la.u)


def test_resume_continues_exactly():
    """Uninterrupted run vs. a run rebuilt at step 5 from the state dict: same draws, same loss map."""
    opts = dict(timestep_sampling="loss_map", loss_map_unbiased=True, loss_type="huber", min_snr_gamma=5.0)
    x = latents()

    def run(e, steps):
        out = []
        for step in steps:
            levels = e.sample_levels(step, 4)
            noise = e.sample_noise(x, step)
            noisy, target = e.make_inputs(x, noise, levels)
            result = e.loss(0.9 * target + 0.1, target, levels, step)
            e.record(result, levels)
            out.append((levels.timesteps, noise, result.loss))
        return out

    full = engine(**opts)
    reference = run(full, range(10))
    first = engine(**opts)
    run(first, range(5))
    resumed = engine(**opts)
    resumed.load_state_dict(first.state_dict())
    for (t_ref, n_ref, l_ref), (t, n, l) in zip(reference[5:], run(resumed, range(5, 10))):
        assert torch.equal(t_ref, t) and torch.equal(n_ref, n) and torch.equal(l_ref, l)
    assert torch.equal(full.loss_map.values, resumed.loss_map.values)
    assert not torch.all(full.loss_map.values == 1)  # the map did move


# ------------------------------------------------------------------------------------------------------------ levels
def test_levels_types_and_ranges():
    lv = engine(min_timestep=200, max_timestep=400).sample_levels(0, 512, device="cpu")
    assert lv.timesteps.dtype == torch.long and int(lv.timesteps.min()) >= 200 and int(lv.timesteps.max()) <= 399
    assert torch.equal(lv.bins, lv.timesteps) and lv.sigma is None
    torch.testing.assert_close(lv.snr, snr_from_alphas_cumprod(sd_alphas_cumprod())[lv.timesteps].float())
    lv = engine("sd3", "flow", min_timestep=200, max_timestep=400, timestep_shift=3.0).sample_levels(0, 512)
    assert lv.timesteps.dtype == torch.float32 and float(lv.sigma.min()) >= 0.2 and float(lv.sigma.max()) <= 0.4
    torch.testing.assert_close(lv.timesteps, 1000 * lv.sigma)
    torch.testing.assert_close(lv.bins, torch.floor(lv.sigma.double() * 1000).long(), rtol=0, atol=1)
    assert float(lv.u.min()) >= 0 and float(lv.u.max()) < 1 and lv.sample_weight.tolist() == [1.0] * 512


def test_flow_shift_is_applied():
    U = rng.uniforms(1234, 0, 0, 256)  # what a uniform sampler draws at step 0, rank 0
    lv = engine("sd3", "flow", timestep_shift=3.0).sample_levels(0, 256)
    torch.testing.assert_close(lv.sigma.double(), (3 * U / (1 + 2 * U)).clamp(min=1e-3), rtol=1e-6, atol=1e-7)
    # flow_shift: the shift used when --timestep_shift stays 1
    cfg = LossConfig(family="sd3", prediction_type="flow")
    e = LossEngine(cfg, "flow", "flow", None, seed=1234, rank=0, world_size=1, max_train_steps=10, flow_shift=3.0)
    torch.testing.assert_close(e.sample_levels(0, 256).sigma, lv.sigma)
    assert e.metadata()["ss_timestep_shift"] == "3.0"


def test_flux_shift_needs_the_latent_size():
    e = engine("sd3", "flow", timestep_sampling="flux_shift")
    with pytest.raises(ValueError, match="latent_shape"):
        e.sample_levels(0, 4)
    small = e.sample_levels(0, 256, latent_shape=(256, 16, 32, 32)).sigma.mean()
    large = e.sample_levels(0, 256, latent_shape=(256, 16, 128, 128)).sigma.mean()
    assert large > small  # more tokens, larger shift, noisier


def test_stratified_global_batch_covers_every_stratum():
    world, accum, B = 2, 3, 4
    n = world * accum * B
    strata = []
    for rank in range(world):
        cfg = LossConfig(stratified_timesteps=True)
        e = LossEngine(cfg, "ddpm", "epsilon", None, seed=7, rank=rank, world_size=world, max_train_steps=10,
                       grad_accum_steps=accum)
        for micro in range(accum):
            strata += torch.floor(e.sample_levels(5, B, micro).u.double() * n).long().tolist()
    assert sorted(strata) == list(range(n))


def test_clusters_agree_across_ranks_and_slice_u():
    K = 5
    ranks = [engine(timestep_clusters=K, rank=r, world_size=3) for r in range(3)]
    clusters = [ranks[0].cluster_for_step(s) for s in range(400)]
    assert all(e.cluster_for_step(s) == clusters[s] for e in ranks for s in range(0, 400, 37))
    assert stats.chisquare(torch.bincount(torch.tensor(clusters), minlength=K).numpy()).pvalue > 1e-3
    for s in (0, 1, 2):
        u = ranks[1].sample_levels(s, 64).u  # uniform sampler: u = U'
        k = clusters[s]
        assert float(u.min()) >= k / K and float(u.max()) < (k + 1) / K
    assert engine().cluster_for_step(3) is None


# ------------------------------------------------------------------------------------------------------------ inputs
def test_ddpm_inputs_and_targets():
    x = latents()
    for prediction in ("epsilon", "v_prediction"):
        e = engine(prediction=prediction)
        lv = e.sample_levels(2, 4)
        noise = e.sample_noise(x, 2)
        noisy, target = e.make_inputs(x, noise, lv)
        a = sd_alphas_cumprod()[lv.timesteps].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, a.sqrt() * x + (1 - a).sqrt() * noise)
        expected = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x
        torch.testing.assert_close(target, expected)


def test_flow_inputs_targets_and_x0_preconditioning():
    x = latents(C=16)
    e = engine("sd3", "flow")
    lv = e.sample_levels(2, 4)
    noise = e.sample_noise(x, 2)
    noisy, target = e.make_inputs(x, noise, lv)
    s = lv.sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x + s * noise)
    torch.testing.assert_close(target, noise - x)
    assert float(e.loss(target, target, lv, 2).loss) == 0.0
    # preconditioned: the target is x0 and the perfect output F = ε − x0 gives x̂0 = x_σ − σF = x0
    e0 = engine("sd3", "flow_x0")
    noisy0, target0 = e0.make_inputs(x, noise, lv)
    torch.testing.assert_close(target0, x)
    assert float(e0.loss(noise - x, target0, lv, 2, noisy=noisy0).loss) < 1e-10
    with pytest.raises(ValueError, match="noisy"):
        e0.loss(noise - x, target0, lv, 2)


def test_noise_extras():
    x = latents(B=8, H=32, W=32) + 3.0  # latents with a mean: adaptive offset grows with it
    plain = engine().sample_noise(x, 4)
    offset = engine(noise_offset=0.5, adaptive_noise_scale=0.1).sample_noise(x, 4)
    shift = (offset - plain).mean((2, 3))  # per (sample, channel) constant
    torch.testing.assert_close(offset - plain, shift[:, :, None, None].expand_as(plain), rtol=0, atol=1e-5)
    assert 0.3 < float(shift.std()) < 1.5  # N(0, (0.5 + 0.1·3)²)
    multires = engine(multires_noise_iterations=6).sample_noise(x, 4)
    torch.testing.assert_close(multires.std((1, 2, 3)), torch.ones(8), rtol=1e-4, atol=1e-4)
    assert not torch.equal(multires, plain)
    # input perturbation changes the noisy input, not the target
    lv = engine().sample_levels(4, 8)
    noisy, target = engine().make_inputs(x, plain, lv)
    noisy_ip, target_ip = engine(ip_noise_gamma=0.1).make_inputs(x, plain, lv)
    assert torch.equal(target, target_ip) and not torch.equal(noisy, noisy_ip)
    a = sd_alphas_cumprod()[lv.timesteps].float().view(-1, 1, 1, 1)
    xi = (noisy_ip - noisy) / ((1 - a).sqrt() * 0.1)
    assert abs(float(xi.std()) - 1) < 0.05  # the perturbation is γ·ξ, ξ ~ N(0, 1)


# ------------------------------------------------------------------------------------------------------------ loss
def test_loss_assembly_order_and_plain_mean():
    e = engine(loss_type="huber", min_snr_gamma=5.0)
    x = latents()
    lv = e.sample_levels(0, 4)
    noise = e.sample_noise(x, 0)
    _, target = e.make_inputs(x, noise, lv)
    pred = target + 0.3 * latents(seed=1)
    dataset_weights = torch.tensor([1.0, 0.5, 1.0, 2.0])
    result = e.loss(pred, target, lv, 0, sample_weights=dataset_weights)
    c = huber_c_snr(0.1, 1.0, lv.timesteps, lv.snr).view(-1, 1, 1, 1)
    d = pred - target
    raw = (2 * c * (torch.sqrt(d**2 + c**2) - c)).mean((1, 2, 3))
    torch.testing.assert_close(result.raw, raw, rtol=1e-5, atol=1e-6)
    weights = dataset_weights * min_snr_weight(lv.snr, 5.0, "epsilon")
    torch.testing.assert_close(result.weighted, raw * weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.loss, (raw * weights).mean(), rtol=1e-5, atol=1e-6)  # never Σwℓ/Σw


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_zero_terminal_snr_loss_is_finite_at_every_timestep(prediction):
    extra = dict(v_pred_like_loss=0.2) if prediction == "epsilon" else dict(scale_v_pred_loss_like_noise_pred=True)
    cfg = LossConfig(prediction_type=prediction, loss_type="huber", min_snr_gamma=5.0, debiased_estimation_loss=True,
                     loss_curve_offset=0.3, **extra)
    e = LossEngine(cfg, "ddpm", prediction, sd_alphas_cumprod(), seed=0, rank=0, world_size=1, max_train_steps=10,
                   zero_terminal_snr=True)
    assert float(e.schedule.alphas_cumprod[-1]) == 0.0
    grid = e.grid_levels()
    lv = NoiseLevels(u=grid.u.float(), timesteps=grid.timesteps, bins=grid.bins, snr=grid.snr.float(), sigma=None,
                     sample_weight=torch.ones(1000))
    x = torch.randn(1000, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noisy, target = e.make_inputs(x, e.sample_noise(x, 0), lv)
    pred = (target + 0.1).requires_grad_(True)
    result = e.loss(pred, target, lv, 0)
    result.loss.backward()
    assert torch.isfinite(result.weighted).all() and torch.isfinite(pred.grad).all() and torch.isfinite(noisy).all()
    torch.testing.assert_close(grid.snr, snr_from_alphas_cumprod(rescale_zero_terminal_snr(sd_alphas_cumprod())))


def test_combined_and_experimental_losses_run():
    x = latents()
    for options in (dict(loss_type="combined", cosine_dim="channel"), dict(loss_type="clustered_mse"),
                    dict(loss_type="ew"), dict(loss_type="smooth_l1", huber_schedule="exponential")):
        e = engine(**options)
        lv = e.sample_levels(0, 4)
        _, target = e.make_inputs(x, e.sample_noise(x, 0), lv)
        result = e.loss(target + 0.1, target, lv, 0)
        assert torch.isfinite(result.loss) and result.raw.shape == (4,)
    mse = engine().loss(target + 0.1, target, lv, 0).loss
    torch.testing.assert_close(engine(loss_type="clustered_mse").loss(target + 0.1, target, lv, 0).loss, mse)


# ------------------------------------------------------------------------------------------------------------ loss map
def test_loss_map_sampling_follows_the_map_and_importance_weights():
    e = engine(timestep_sampling="loss_map", loss_map_unbiased=True, loss_map_mix=0.2)
    e.loss_map.values[600:700] = 20.0  # a hard region
    probs = e.bin_probabilities()
    lv = e.sample_levels(0, 4000)
    counts = torch.bincount(lv.bins, minlength=1000).double()
    groups = torch.arange(1000) // 100
    expected = torch.zeros(10, dtype=torch.float64).index_add_(0, groups, probs) * 4000
    observed = torch.zeros(10, dtype=torch.float64).index_add_(0, groups, counts)
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    base = 1 / 1000  # uniform base sampler
    torch.testing.assert_close(lv.sample_weight.double(), base / probs[lv.bins], rtol=1e-5, atol=0)
    # E_P[w] = Σ P·P_base/P = 1
    assert float(lv.sample_weight.mean()) == pytest.approx(1.0, abs=0.05)


def test_loss_map_flow_bins_and_record_with_gather():
    e = engine("sd3", "flow", timestep_sampling="loss_map", timestep_shift=3.0)
    lv = e.sample_levels(0, 256)
    assert int(lv.bins.min()) >= 1  # σ ≥ 1/T: bin 0 is never drawn
    torch.testing.assert_close(lv.bins, torch.floor(lv.sigma.double() * 1000).clamp(max=999).long(), rtol=0, atol=1)
    result = e.loss(torch.zeros(256, 16, 2, 2), torch.full((256, 16, 2, 2), 2.0), lv, 0)  # loss 4, map 1
    calls = []

    def gather(t):  # two ranks with identical data: the map sees the sequence twice
        calls.append(t.shape)
        return torch.cat([t, t])

    e.record(result, lv, gather)
    assert calls and not torch.all(e.loss_map.values == 1)
    assert e.state_dict()["loss_map"]["values"].shape == (1000,)


def test_loss_map_offset_weights_follow_the_map():
    e = engine(loss_map_offset=True, steps=100)
    e.loss_map.values[:500] = 3.0  # mean 2: bins < 500 weigh 1.5, others 0.5 at step 0
    lv = e.sample_levels(0, 64)
    expected = torch.where(lv.bins < 500, 1.5, 0.5)
    torch.testing.assert_close(e.timestep_weights(lv, 0), expected)
    torch.testing.assert_close(e.timestep_weights(lv, 100), torch.ones(64))  # faded out at the end


def test_record_without_a_map_is_a_no_op():
    e = engine()
    lv = e.sample_levels(0, 2)
    e.record(e.loss(torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2), lv, 0), lv)
    assert e.loss_map is None and e.state_dict() == {}
    e.load_state_dict({})

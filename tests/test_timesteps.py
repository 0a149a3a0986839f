"""Samplers as inverse CDFs: each against its analytic CDF (Kolmogorov–Smirnov), densities, diffusers, slices."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logit

from library import timesteps as T
from library.schedules import DDPMSchedule, FlowSchedule, TimestepRange, sd_alphas_cumprod

N = 4000
P_MIN = 1e-3  # a correct sampler fails this KS test once in a thousand runs; the draws are seeded, so never here


def diffusers_sd3_functions() -> dict:
    """diffusers' ``compute_density_for_timestep_sampling`` and ``compute_loss_weighting_for_sd3``, compiled from
    the installed diffusers' own source: importing ``diffusers.training_utils`` pulls in bitsandbytes and takes
    seconds, the two functions need only torch and math."""
    import ast
    import importlib.util

    path = importlib.util.find_spec("diffusers").submodule_search_locations[0] + "/training_utils.py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    wanted = {"compute_density_for_timestep_sampling", "compute_loss_weighting_for_sd3"}
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], type_ignores=[])
    namespace = {"torch": torch, "math": math}
    exec(compile(module, path, "exec"), namespace)
    assert wanted <= namespace.keys()
    return namespace


def uniforms(n=N, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shifted_cdf(base_cdf, s):
    """CDF of S_s(x), x ~ base: P(S_s(x) ≤ u) = base_cdf(S_{1/s}(u)), S_a(y) = a·y/(1 + (a − 1)·y)."""
    return lambda u: base_cdf((u / s) / (1 + (1 / s - 1) * u))


# Analytic CDFs written independently of the library (scipy), one per sampler.
CASES = {
    "uniform": (T.Uniform(), stats.uniform.cdf),
    "logit_normal": (T.LogitNormal(0.0, 1.0), lambda u: stats.norm.cdf(logit(u))),
    "logit_normal(0.5, 0.7)": (T.LogitNormal(0.5, 0.7), lambda u: stats.norm.cdf((logit(u) - 0.5) / 0.7)),
    "sigmoid(2)": (T.build_sampler("sigmoid", T.SamplerParams(sigmoid_scale=2.0)), lambda u: stats.norm.cdf(logit(u) / 2)),
    "cosmap": (T.CosMap(), lambda u: 2 / np.pi * np.arctan(u / (1 - u))),
    "beta(2, 5)": (T.Beta(2.0, 5.0), stats.beta(2, 5).cdf),
    "beta(0.5, 0.5)": (T.Beta(0.5, 0.5), stats.beta(0.5, 0.5).cdf),
    "shift(3)": (T.build_sampler("shift", T.SamplerParams(discrete_flow_shift=3.0)), shifted_cdf(lambda x: stats.norm.cdf(logit(x)), 3.0)),
    "flux_shift(4096 tokens)": (T.build_sampler("flux_shift", T.SamplerParams(), tokens=4096),
                                shifted_cdf(lambda x: stats.norm.cdf(logit(x)), math.exp(1.15))),
}


@pytest.mark.parametrize("name", CASES)
def test_sampler_matches_analytic_cdf(name):
    sampler, cdf = CASES[name]
    u = sampler.icdf(uniforms()).numpy()
    assert np.all((u >= 0) & (u <= 1))
    assert stats.kstest(u, cdf).pvalue > P_MIN
    # the sampler's own CDF is the analytic one
    grid = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(sampler.cdf(torch.from_numpy(grid)).numpy(), cdf(grid), atol=3e-4)


def test_mode_matches_diffusers_draw_for_draw():
    """diffusers draws f(U) = 1 − U − s·(cos²(πU/2) − 1 + U); ours is f(1 − U'): same U' = 1 − U gives the same u."""
    ref = diffusers_sd3_functions()["compute_density_for_timestep_sampling"]("mode", 2000, mode_scale=1.29, generator=torch.Generator().manual_seed(5))
    U = torch.rand(2000, generator=torch.Generator().manual_seed(5))  # the draws diffusers made
    torch.testing.assert_close(T.Mode(1.29).icdf(1 - U.double()).float(), ref, rtol=0, atol=1e-6)
    # and its CDF (bisection of the inverse) is what the draws follow
    assert stats.kstest(ref.numpy(), lambda u: T.Mode(1.29).cdf(torch.from_numpy(np.asarray(u))).numpy()).pvalue > P_MIN


def test_logit_normal_matches_diffusers_distribution():
    ref = diffusers_sd3_functions()["compute_density_for_timestep_sampling"]("logit_normal", N, logit_mean=0.3, logit_std=1.2,
                                                generator=torch.Generator().manual_seed(6))
    ours = T.LogitNormal(0.3, 1.2).icdf(uniforms(seed=7))
    assert stats.ks_2samp(ref.numpy(), ours.numpy()).pvalue > P_MIN


@pytest.mark.parametrize("sampler", [T.Uniform(), T.LogitNormal(0.4, 0.8), T.Mode(1.29), T.Mode(-0.5), T.CosMap(),
                                     T.Beta(2.0, 3.0), T.Shifted(T.LogitNormal(0, 1), 3.0)], ids=repr)
def test_density_is_the_derivative_of_the_cdf(sampler):
    u = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    if isinstance(sampler, T.Beta):  # its CDF interpolates a quantile table, so compare with scipy's pdf instead
        numeric = torch.from_numpy(stats.beta(sampler.alpha, sampler.beta).pdf(u.numpy()))
    else:
        h = 1e-5
        numeric = (sampler.cdf(u + h) - sampler.cdf(u - h)) / (2 * h)
    torch.testing.assert_close(sampler.density(u), numeric, rtol=1e-4, atol=1e-4)
    grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    assert float(sampler.density(grid).mean()) == pytest.approx(1.0, abs=2e-3)  # integrates to 1


def test_samplers_are_increasing_in_U():
    U = torch.linspace(0, 1 - 1e-9, 1001, dtype=torch.float64)
    for name in T.SAMPLER_NAMES:
        sampler = T.build_sampler(name, T.SamplerParams(beta_alpha=2, beta_beta=2), step=10, total_steps=100, tokens=1024)
        u = sampler.icdf(U)
        assert torch.all(u[1:] >= u[:-1]), name
        assert 0 <= float(u.min()) and float(u.max()) <= 1, name


def test_mode_scale_range_is_where_the_map_is_monotone():
    U = torch.linspace(0, 1, 10001, dtype=torch.float64)
    low, high = T.MODE_SCALE_RANGE
    for s in (low, 0.0, 1.29, high):
        assert torch.all(torch.diff(T.Mode(s).icdf(U)) >= -1e-12)
    def diffusers_mode(x, s):  # f(x) = 1 − x − s·(cos²(πx/2) − 1 + x), unclamped
        return 1 - x - s * (torch.cos(math.pi * x / 2) ** 2 - 1 + x)

    for s in (low, 1.29, high):
        assert torch.all(torch.diff(diffusers_mode(U, s)) <= 1e-12)  # decreasing: a valid (reversed) inverse CDF
    for s in (low - 0.1, high + 0.1):
        assert torch.any(torch.diff(diffusers_mode(U, s)) > 0)  # outside the range it folds over


def test_logit_normal_dynamic_mean_moves_then_stays():
    assert T.dynamic_logit_mean(0, 1000, 0.0, 0.65, 0.8) == 0.0
    assert T.dynamic_logit_mean(400, 1000, 0.0, 0.65, 0.8) == pytest.approx(0.325)
    assert T.dynamic_logit_mean(800, 1000, 0.0, 0.65, 0.8) == pytest.approx(0.65)
    assert T.dynamic_logit_mean(1000, 1000, 0.0, 0.65, 0.8) == pytest.approx(0.65)
    sampler = T.build_sampler("logit_normal_dynamic", T.SamplerParams(logit_mean=-0.2, logit_std=0.9), step=400,
                              total_steps=1000)
    mean = -0.2 + (0.65 + 0.2) * 0.5
    assert stats.kstest(sampler.icdf(uniforms()).numpy(), lambda u: stats.norm.cdf((logit(u) - mean) / 0.9)).pvalue > P_MIN


def test_flux_shift_mu():
    assert T.flux_shift_mu(256) == pytest.approx(0.5)
    assert T.flux_shift_mu(4096) == pytest.approx(1.15)
    assert T.image_tokens(128, 128) == 4096  # 1024² image: 128² latent, 2×2 patches
    with pytest.raises(ValueError):
        T.build_sampler("flux_shift", T.SamplerParams())  # needs the image size
    with pytest.raises(ValueError):
        T.build_sampler("gaussian", T.SamplerParams())


def test_cluster_slices_are_quantile_slices_and_keep_the_marginal():
    sampler, cdf = CASES["logit_normal(0.5, 0.7)"]
    K = 10
    U = uniforms()
    for k in (0, 3, 9):
        u = sampler.icdf(T.cluster_slice(U, k, K)).numpy()
        q = cdf(u)  # quantile of each draw
        assert q.min() >= k / K - 1e-9 and q.max() <= (k + 1) / K + 1e-9
        assert stats.kstest(q, stats.uniform(k / K, 1 / K).cdf).pvalue > P_MIN  # uniform inside the slice
    ks = torch.randint(K, (N,), generator=torch.Generator().manual_seed(9))
    mixed = sampler.icdf(T.cluster_slice(U, ks, K)).numpy()
    assert stats.kstest(mixed, cdf).pvalue > P_MIN  # uniformly drawn clusters: the sampler's own marginal


def test_stratified_covers_every_stratum_once():
    n = 64
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    U = T.stratified(uniforms(n), perm, n)
    assert sorted(torch.floor(U * n).long().tolist()) == list(range(n))
    assert torch.equal(torch.floor(U * n).long(), perm)


@pytest.mark.parametrize("schedule", [DDPMSchedule(sd_alphas_cumprod()), FlowSchedule(3.0)], ids=["ddpm", "flow"])
def test_bin_probabilities_match_the_draws(schedule):
    sampler = T.LogitNormal(0.0, 1.0)
    rng = TimestepRange(100, 900)
    probs = T.bin_probabilities(sampler, schedule.bin_edges_u(rng))
    assert float(probs.sum()) == pytest.approx(1.0)
    u = sampler.icdf(uniforms(200_000, seed=11))
    bins = schedule.bins(schedule.timesteps_from_u(u, rng) if schedule.kind == "ddpm" else schedule.sigmas_from_u(u, rng))
    counts = torch.bincount(bins, minlength=1000).double()
    assert float(probs[:100].sum()) == 0.0 and float(probs[900:].sum()) == 0.0
    # 20 coarse groups: observed frequencies against the exact bin probabilities
    groups = torch.arange(1000) // 50
    expected = torch.zeros(20, dtype=torch.float64).index_add_(0, groups, probs) * counts.sum()
    observed = torch.zeros(20, dtype=torch.float64).index_add_(0, groups, counts)
    keep = expected > 0
    assert stats.chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue > P_MIN

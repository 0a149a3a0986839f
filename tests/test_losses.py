"""Elementwise losses, Huber thresholds, combined / experimental losses, reduction (spec §1, §2, §5.4, §6)."""
import math

import pytest
import torch

from library import losses
from library.schedules import rescale_zero_terminal_snr, sd_alphas_cumprod, snr_from_alphas_cumprod


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------ §1
@pytest.mark.parametrize("fn, c, d, expected", [
    # 2c(√(d² + c²) − c): c = 0.1, d = 1: 0.2·(√1.01 − 0.1) = 0.2·0.9049875621 = 0.1809975124
    (losses.pseudo_huber, 0.1, 1.0, 0.1809975124),
    # c = 1, d = 1: 2·(√2 − 1) = 0.8284271247
    (losses.pseudo_huber, 1.0, 1.0, 0.8284271247),
    # 2(√(d² + c²) − c): c = 0.1, d = 1: 2·0.9049875621 = 1.809975124
    (losses.smooth_l1, 0.1, 1.0, 1.809975124),
])
def test_spec_oracles(fn, c, d, expected):
    assert float(fn(t([d]), c)) == pytest.approx(expected, rel=1e-9)  # the spec gives 10 digits


def test_huber_limits():
    # near 0: 2c·d²/(√(d²+c²)+c) → 2c·d²/(2c) = d²; far out: → 2c·|d|
    assert float(losses.pseudo_huber(t([1e-4]), 1.0)) / 1e-8 == pytest.approx(1.0, rel=1e-8)
    assert float(losses.pseudo_huber(t([1e6]), 0.1)) / (2 * 0.1 * 1e6) == pytest.approx(1.0, rel=1e-6)
    # smooth_l1 near 0: d²/c; far out: 2|d|
    assert float(losses.smooth_l1(t([1e-4]), 0.5)) / (1e-8 / 0.5) == pytest.approx(1.0, rel=1e-8)
    assert float(losses.smooth_l1(t([-1e6]), 0.1)) / 2e6 == pytest.approx(1.0, rel=1e-6)


def test_stable_forms_in_fp32_when_d_much_smaller_than_c():
    d = torch.tensor([1e-4, 3e-5, 1e-3], dtype=torch.float32)
    c = 1.0
    exact_huber = 2 * c * (torch.sqrt(d.double() ** 2 + c**2) - c)   # fp64 reference
    naive_fp32 = 2 * c * (torch.sqrt(d**2 + c**2) - c)                # what the naive form gives in fp32
    assert naive_fp32[0] == 0 and naive_fp32[1] == 0                   # it cancels to 0
    stable = losses.pseudo_huber(d, c)
    torch.testing.assert_close(stable.double(), exact_huber, rtol=1e-6, atol=0)
    exact_smooth = 2 * (torch.sqrt(d.double() ** 2 + c**2) - c)
    torch.testing.assert_close(losses.smooth_l1(d, c).double(), exact_smooth, rtol=1e-6, atol=0)


def test_per_sample_threshold_broadcasts_over_sample():
    d = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    c = t([0.1, 1.0])
    out = losses.pseudo_huber(d, c)
    assert torch.allclose(out[0], torch.full_like(out[0], 0.1809975124))
    assert torch.allclose(out[1], torch.full_like(out[1], 0.8284271247))


def test_elementwise_l2_l1():
    pred, target = t([[1.0, -2.0]]), t([[0.5, 1.0]])
    assert losses.elementwise_loss(pred, target, "l2").tolist() == [[0.25, 9.0]]
    assert losses.elementwise_loss(pred, target, "l1").tolist() == [[0.5, 3.0]]
    with pytest.raises(ValueError):
        losses.elementwise_loss(pred, target, "huber")


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_conditional_loss_fp16_equals_fp32(loss_type):
    """KS computes in the input dtype: fp16 gives NaN/inf at |d| = 300 (d² > 65504) and 0 at |d| = 1e-4 (d² below
    fp16's smallest subnormal). The facade computes in fp32: fp16 inputs give the fp32 value of the same numbers."""
    pred16 = torch.tensor([[300.0, 1e-4, -2.0, 0.5]], dtype=torch.float16)
    target16 = torch.zeros_like(pred16)
    c = torch.tensor([0.1])
    for reduction in ("none", "mean", "sum"):
        got = losses.conditional_loss(pred16, target16, loss_type, reduction, c)
        want = losses.conditional_loss(pred16.float(), target16.float(), loss_type, reduction, c)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    none = losses.conditional_loss(pred16, target16, loss_type, "none", c)
    d = pred16.float()
    if loss_type == "l2":
        assert float(none[0, 1]) == pytest.approx(float(d[0, 1]) ** 2, rel=1e-6) and float(none[0, 0]) == 90000.0
    assert float(none[0, 1]) > 0  # |d| = 1e-4 no longer rounds to 0


def test_conditional_loss_matches_ks_formulas():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    c = torch.tensor([0.1, 0.5, 1.0])
    cv = c.view(-1, 1, 1, 1)
    ks_huber = 2 * cv * (torch.sqrt((pred - target) ** 2 + cv**2) - cv)   # KS train_util, naive form
    ks_smooth = 2 * (torch.sqrt((pred - target) ** 2 + cv**2) - cv)
    torch.testing.assert_close(losses.conditional_loss(pred, target, "huber", "none", c), ks_huber, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.conditional_loss(pred, target, "smooth_l1", "sum", c), ks_smooth.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(losses.conditional_loss(pred, target, "l2", "mean"), torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(losses.conditional_loss(pred, target, "l1", "sum"), (pred - target).abs().sum())
    # a float threshold works like a constant per-sample one
    torch.testing.assert_close(losses.conditional_loss(pred, target, "huber", "mean", 0.5),
                               losses.conditional_loss(pred, target, "huber", "mean", torch.full((3,), 0.5)))
    with pytest.raises(ValueError):
        losses.conditional_loss(pred, target, "huber", "mean", None)
    with pytest.raises(ValueError):
        losses.conditional_loss(pred, target, "l2", "average")


# ------------------------------------------------------------------------------------------------------------ §2
@pytest.fixture(scope="module")
def sd_snr():
    return snr_from_alphas_cumprod(sd_alphas_cumprod())


def test_snr_schedule_anchor_points(sd_snr):
    c = losses.huber_c_snr(0.1, 1.0, torch.arange(1000), sd_snr)
    assert float(c[0]) == pytest.approx(0.9497, abs=5e-5)
    assert float(c[499]) == pytest.approx(0.2318, abs=5e-5)
    assert float(c[999]) == pytest.approx(0.1037, abs=5e-5)
    assert torch.all(c[1:] <= c[:-1])  # smaller (more robust) threshold at higher noise


def test_scale_applies_to_every_schedule(sd_snr):
    steps = torch.arange(1000).double()
    for schedule in losses.HUBER_SCHEDULES:
        one = losses.huber_threshold(schedule, 0.1, 1.0, steps, sd_snr)
        two = losses.huber_threshold(schedule, 0.1, 2.5, steps, sd_snr)
        torch.testing.assert_close(two, 2.5 * one)


def test_constant_and_exponential_schedules(sd_snr):
    steps = t([0.0, 500.0, 1000.0])
    snr = sd_snr[:3]
    assert losses.huber_c_constant(0.1, 2.0, steps, snr).tolist() == pytest.approx([0.2] * 3)
    # c(0) = k, c(500) = k·√c0, c(1000) = k·c0
    assert losses.huber_c_exponential(0.1, 2.0, steps, snr).tolist() == pytest.approx([2.0, 2 * math.sqrt(0.1), 0.2])


def test_snr_schedule_flow_form_and_zero_snr():
    sigma = torch.linspace(0.001, 1.0, 101, dtype=torch.float64)
    snr = ((1 - sigma) / sigma) ** 2
    c = losses.huber_c_snr(0.1, 1.5, 1000 * sigma, snr)
    torch.testing.assert_close(c, 1.5 * ((1 - 0.1) * (1 - sigma) ** 2 + 0.1))
    assert float(c[-1]) == pytest.approx(1.5 * 0.1)  # σ = 1: SNR 0, r = ∞ → k·c0
    zt = snr_from_alphas_cumprod(rescale_zero_terminal_snr(sd_alphas_cumprod()))
    c = losses.huber_c_snr(0.1, 1.0, torch.arange(1000), zt)
    assert torch.isfinite(c).all() and float(c[999]) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------------------ combined
def test_combined_terms():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    d = pred - target
    torch.testing.assert_close(losses.combined_loss(pred, target, {"mse": 1.0}), d * d)
    torch.testing.assert_close(losses.combined_loss(pred, target, {"l1": 1.0}), d.abs())
    # default 0.4/0.4/0.2 with cosine spatial: per (sample, channel) over H·W
    cos = torch.nn.functional.cosine_similarity(pred.flatten(2), target.flatten(2), dim=2)  # [B, C]
    expected = 0.4 * d * d + 0.4 * d.abs() + 0.2 * (1 - cos)[:, :, None, None]
    torch.testing.assert_close(losses.combined_loss(pred, target, losses.DEFAULT_COMBINED_WEIGHTS), expected)


@pytest.mark.parametrize("dim", losses.COSINE_DIMS)
def test_cosine_distance_extremes(dim):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 3, generator=g)
    assert torch.allclose(losses.cosine_distance(2 * x, x, dim), torch.zeros(()), atol=1e-6)  # same direction → 0
    assert torch.allclose(losses.cosine_distance(-x, x, dim), torch.full((), 2.0), atol=1e-6)  # opposite → 2
    shapes = {"spatial": (2, 4, 1, 1), "channel": (2, 1, 3, 3), "flat": (2, 1, 1, 1)}
    assert losses.cosine_distance(x, x, dim).shape == shapes[dim]


def test_combined_cosine_ignores_masked_pixels():
    x = torch.ones(1, 1, 2, 2)
    pred = x.clone()
    pred[..., 1, 1] = -5.0  # wrong only where the mask is 0
    mask = torch.ones(1, 1, 2, 2)
    mask[..., 1, 1] = 0
    assert float(losses.combined_loss(pred, x, {"cosine": 1.0}, "flat", mask).max()) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.combined_loss(pred, x, {"cosine": 1.0}, "flat").max()) > 0.5


# ------------------------------------------------------------------------------------------------------------ §5.4
def test_clustered_mse_equals_mse_in_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(3, 4, 8, 8, generator=g)
    pred_a = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    pred_b = pred_a.detach().clone().requires_grad_(True)
    clustered = losses.per_sample_mean(losses.clustered_mse(pred_a, target))
    mse = losses.per_sample_mean((pred_b - target) ** 2)
    torch.testing.assert_close(clustered, mse)
    clustered.sum().backward()
    mse.sum().backward()
    torch.testing.assert_close(pred_a.grad, pred_b.grad)
    # and it really clusters: at most 8 distinct values per sample
    values = losses.clustered_mse(pred_a.detach(), target)
    assert all(v.unique().numel() <= losses.CLUSTERED_MSE_CLUSTERS for v in values)


def test_ew_blend_endpoints():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    ab = torch.tensor([0.9, 0.1])
    d2 = (pred - target) ** 2
    torch.testing.assert_close(losses.ew_loss(pred, target, ab, torch.zeros(2)), d2)  # β = 0: MSE
    full = losses.ew_loss(pred, target, ab, torch.ones(2))                                # β = 1: L per (sample, channel)
    assert torch.isfinite(full).all()
    assert torch.allclose(full, full[..., :1, :1].expand_as(full))  # constant over H·W
    # L ≤ max(F, q) by construction; with boundary shift the exponent weights change the value
    assert not torch.allclose(full, losses.ew_loss(pred, target, ab, torch.ones(2), boundary_shift=1.0))


def test_map_position_flat_spread_and_trained_range():
    bins = torch.tensor([0, 5, 9])
    assert losses.map_position(torch.ones(10), bins).tolist() == [0.0, 0.0, 0.0]  # flat map: no division by 0
    values = torch.arange(10, dtype=torch.float32) + 1  # 1..10
    assert losses.map_position(values, bins).tolist() == pytest.approx([0.0, 5 / 9, 1.0])
    # only bins 2..7 are trained: min 3, max 8 there; the untrained bins (kept at 1.0 in a run) set nothing
    trained = torch.zeros(10, dtype=torch.bool)
    trained[2:8] = True
    values[:2] = 1.0
    values[8:] = 1.0
    assert losses.map_position(values, torch.tensor([2, 4, 7]), trained).tolist() == pytest.approx([0.0, 0.4, 1.0])


def test_ew_blend_is_the_published_formula():
    """Worked example of ew_blend's docstring: ι = (max − M)/(max − min), ι' = 0.5ι + 0.5·median(ι),
    β = ι'·max(0, 1 − 2·step/total)."""
    values = torch.ones(1000)
    trained = torch.zeros(1000, dtype=torch.bool)
    trained[100:900] = True
    values[100:900] = 2.0
    values[100], values[200], values[300], values[400] = 1.0, 2.0, 3.0, 2.5  # min 1, max 3 over the trained bins
    bins = torch.tensor([100, 200, 300, 400])
    beta = losses.ew_blend(values, bins, 25, 100, trained)
    assert beta.tolist() == pytest.approx([0.34375, 0.21875, 0.09375, 0.15625], abs=1e-7)
    assert losses.ew_blend(values, bins, 0, 100, trained).tolist() == pytest.approx([0.6875, 0.4375, 0.1875, 0.3125])
    assert losses.ew_blend(values, bins, 50, 100, trained).tolist() == [0.0] * 4  # MSE from mid-training on
    assert losses.ew_blend(torch.ones(1000), bins, 0, 100, trained).tolist() == [0.0] * 4  # flat map: MSE


def test_ew_loss_by_hand():
    """One sample, one channel, two pixels, d = (1, 3): a = (1, 3), μ = 2, A = (e^−1, 3e); ᾱ = 0.5:
    F = 0.5·mean(A) + 0.5·std(A); q = mean(d²) = 5; one channel: F < mean_c(F) is false, so
    L = 0.85F + 0.15q; with β = 0.4 the result is 0.6·d² + 0.4·L."""
    pred = torch.tensor([[[[1.0, 3.0]]]])
    target = torch.zeros_like(pred)
    A = torch.tensor([math.exp(-1), 3 * math.exp(1)])
    F = 0.5 * A.mean() + 0.5 * A.std(correction=0)
    L = 0.85 * F + 0.15 * 5.0
    expected = 0.6 * torch.tensor([1.0, 9.0]) + 0.4 * L
    out = losses.ew_loss(pred, target, torch.tensor([0.5]), torch.tensor([0.4]))
    torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_clustered_mse_kmeans_counts_and_mse_identity():
    g = torch.Generator().manual_seed(5)
    target = torch.randn(3, 4, 16, 16, generator=g)
    pred_a = torch.randn(3, 4, 16, 16, generator=g, requires_grad=True)
    pred_b = pred_a.detach().clone().requires_grad_(True)
    counts = losses.kmeans_cluster_counts(torch.tensor([0.0, 0.5, 1.0]))
    assert counts.tolist() == [4, 52, 100]  # 4 + 96·p, rounded
    clustered = losses.per_sample_mean(losses.clustered_mse_kmeans(pred_a, target, counts))
    mse = losses.per_sample_mean((pred_b - target) ** 2)
    torch.testing.assert_close(clustered, mse)
    clustered.sum().backward()
    mse.sum().backward()
    torch.testing.assert_close(pred_a.grad, pred_b.grad)
    values = losses.clustered_mse_kmeans(pred_a.detach(), target, counts)
    distinct = [v.unique().numel() for v in values]
    assert distinct[0] <= 4 and distinct[1] <= 52 and distinct[2] <= 100 and distinct[2] > 52


def test_kmeans_1d_finds_separated_groups():
    values = torch.tensor([[0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 9.2, 9.1]])
    ids = losses.kmeans_1d(values, torch.tensor([3]))
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


# ------------------------------------------------------------------------------------------------------------ reduction
def test_per_sample_mean_with_mask():
    loss = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)  # sample 0: 0,1,2,3; sample 1: 4,5,6,7
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(2, 1, 2, 2)
    assert losses.per_sample_mean(loss).tolist() == [1.5, 5.5]
    assert losses.per_sample_mean(loss, mask).tolist() == [0.0, 1.0]               # KS: mean of loss·mask
    assert losses.per_sample_mean(loss, mask, renormalize=True).tolist() == [0.0, 4.0]  # over the masked area

"""Per-sample timestep weights (spec §4): KS / diffusers oracles, x0-space consistency, finiteness at SNR 0."""
import math

import pytest
import torch

from library import objective
from library import weighting as W
from library.schedules import flow_snr, rescale_zero_terminal_snr, sd_alphas_cumprod, snr_from_alphas_cumprod
from tests.test_timesteps import diffusers_sd3_functions

AB = sd_alphas_cumprod()
SNR = snr_from_alphas_cumprod(AB)
ZT_SNR = snr_from_alphas_cumprod(rescale_zero_terminal_snr(AB))
SIGMA = (torch.arange(1000, dtype=torch.float64) + 1) / 1000  # flow σ grid 1/T..1


# KS library/custom_train_functions.py, transcribed (snr per sample, ``all_snr`` without zero terminal SNR).
def ks_apply_snr_weight(snr, gamma, v_prediction):
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    return torch.div(min_snr_gamma, snr + 1) if v_prediction else torch.div(min_snr_gamma, snr)


def ks_get_snr_scale(snr):
    snr_t = torch.minimum(snr, torch.ones_like(snr) * 1000)
    return snr_t / (snr_t + 1)


def ks_apply_debiased_estimation(snr, v_prediction):
    snr_t = torch.minimum(snr, torch.ones_like(snr) * 1000)
    return 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)


def test_ddpm_weights_match_ks():
    torch.testing.assert_close(W.min_snr_weight(SNR, 5.0, "epsilon"), ks_apply_snr_weight(SNR, 5.0, False))
    torch.testing.assert_close(W.min_snr_weight(SNR, 5.0, "v_prediction"), ks_apply_snr_weight(SNR, 5.0, True))
    torch.testing.assert_close(W.debiased_weight(SNR, "epsilon"), ks_apply_debiased_estimation(SNR, False))
    torch.testing.assert_close(W.debiased_weight(SNR, "v_prediction"), ks_apply_debiased_estimation(SNR, True))
    torch.testing.assert_close(W.scale_v_like_noise_weight(SNR), ks_get_snr_scale(SNR))
    # KS: loss + loss/scale·λ
    torch.testing.assert_close(W.v_pred_like_weight(SNR, 0.2), 1 + 0.2 / ks_get_snr_scale(SNR))


def test_min_snr_values():
    snr = torch.tensor([0.0, 1.0, 5.0, 100.0], dtype=torch.float64)
    assert W.min_snr_weight(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.05])
    assert W.min_snr_weight(snr, 5.0, "v_prediction").tolist() == pytest.approx([0.0, 0.5, 5 / 6, 5 / 101])
    sigma = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)  # SNR 0, 1, 16
    assert W.min_snr_weight(flow_snr(sigma), 5.0, "flow", sigma).tolist() == pytest.approx([0.0, 0.25, 5 * 0.04])
    assert W.min_snr_weight(flow_snr(sigma), 5.0, "flow_x0", sigma).tolist() == pytest.approx([0.0, 1.0, 5.0])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow", "flow_x0"])
def test_min_snr_is_min_snr_gamma_in_x0_space(prediction):
    """w_model·‖model error‖² = min(SNR, γ)·‖x̂0 − x0‖² for a random wrong prediction, x̂0 from the model's output."""
    g = torch.Generator().manual_seed(0)
    B = 6
    x0, eps, delta = (torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    if prediction in ("epsilon", "v_prediction"):
        t = torch.tensor([0, 50, 200, 500, 800, 999])
        ab, snr, sigma = AB[t], SNR[t], None
        noisy = objective.ddpm_noisy(x0, eps, ab)
        target = eps if prediction == "epsilon" else objective.v_target(x0, eps, ab)
        pred = target + delta
        a = ab.view(-1, 1, 1, 1)
        if prediction == "epsilon":
            x0_hat = (noisy - (1 - a).sqrt() * pred) / a.sqrt()
        else:
            x0_hat = a.sqrt() * noisy - (1 - a).sqrt() * pred
    else:
        sigma = torch.tensor([0.001, 0.05, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
        snr = flow_snr(sigma)
        noisy = objective.flow_noisy(x0, eps, sigma)
        target = objective.flow_velocity_target(x0, eps) if prediction == "flow" else x0
        pred = target + delta
        x0_hat = objective.flow_x0_from_prediction(pred, noisy, sigma) if prediction == "flow" else pred
    model_error = (pred - target).square().mean((1, 2, 3))
    x0_error = (x0_hat - x0).square().mean((1, 2, 3))
    torch.testing.assert_close(W.min_snr_weight(snr, 5.0, prediction, sigma) * model_error,
                               torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) * x0_error)


def test_debiased_flow_forms():
    assert W.debiased_weight(flow_snr(SIGMA), "flow", SIGMA).tolist() == pytest.approx((SIGMA * (1 - SIGMA)).tolist())
    # x0 form = velocity form / σ² = √SNR
    torch.testing.assert_close(W.debiased_weight(flow_snr(SIGMA), "flow_x0", SIGMA), flow_snr(SIGMA).sqrt())


def test_sd3_schemes_match_diffusers():
    ref = diffusers_sd3_functions()["compute_loss_weighting_for_sd3"]
    sigma = SIGMA.float()
    for scheme in ("sigma_sqrt", "cosmap", "uniform", "none"):
        torch.testing.assert_close(W.sd3_scheme_weight(scheme, sigma), ref(scheme, sigma))
    assert float(W.sd3_scheme_weight("sigma_sqrt", SIGMA).max()) == pytest.approx(1e6)  # finite: σ ≥ 1/T


ALL_ON = dict(min_snr_gamma=5.0, debiased_estimation_loss=True, loss_curve_offset=0.5,
              loss_curve_offset_schedule=-0.3, loss_map_offset=True)


@pytest.mark.parametrize("prediction, extra", [
    ("epsilon", dict(v_pred_like_loss=0.3)), ("v_prediction", dict(scale_v_pred_loss_like_noise_pred=True))])
@pytest.mark.parametrize("snr_table", [SNR, ZT_SNR], ids=["sd", "zero_terminal_snr"])
def test_ddpm_weights_finite_at_every_timestep(prediction, extra, snr_table):
    opts = W.WeightOptions(prediction_type=prediction, **ALL_ON, **extra)
    t = torch.arange(1000)
    map_values = torch.linspace(0.5, 2.0, 1000)
    for dtype in (torch.float64, torch.float32):  # fp32 is what training uses
        w = W.timestep_weights(opts, snr_table.to(dtype), None, t.to(dtype) / 1000, t, 10, 100, map_values)
        assert torch.isfinite(w).all() and (w >= 0).all()
    for name in ("min_snr_weight", "debiased_weight"):
        assert torch.isfinite(getattr(W, name)(snr_table, *((5.0,) if name == "min_snr_weight" else ()), prediction)).all()
    if prediction == "epsilon":
        assert float(W.min_snr_weight(ZT_SNR, 5.0, "epsilon")[999]) == 1.0  # = 1 at SNR 0


@pytest.mark.parametrize("prediction", ["flow", "flow_x0"])
@pytest.mark.parametrize("scheme", ["uniform", "sigma_sqrt", "cosmap"])
def test_flow_weights_finite_at_every_sigma(prediction, scheme):
    opts = W.WeightOptions(prediction_type=prediction, weighting_scheme=scheme, **ALL_ON)
    w = W.timestep_weights(opts, flow_snr(SIGMA), SIGMA, SIGMA, torch.arange(1000), 0, 100, torch.ones(1000))
    assert torch.isfinite(w).all() and (w >= 0).all()


def test_timestep_weights_is_the_product_in_spec_order():
    sigma = SIGMA[::97]
    snr = flow_snr(sigma)
    bins = torch.floor(sigma * 1000).clamp(max=999).long()
    values = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    opts = W.WeightOptions(prediction_type="flow", weighting_scheme="cosmap", min_snr_gamma=3.0,
                           debiased_estimation_loss=True, loss_curve_offset=0.2, loss_curve_offset_schedule=0.1,
                           loss_map_offset=True)
    expected = (W.sd3_scheme_weight("cosmap", sigma) * W.min_snr_weight(snr, 3.0, "flow", sigma)
                * W.debiased_weight(snr, "flow", sigma) * W.loss_curve_offset_weight(sigma, 30, 100, 0.2, 0.1)
                * W.loss_map_offset_weight(values, bins, 30, 100))
    torch.testing.assert_close(W.timestep_weights(opts, snr, sigma, sigma, bins, 30, 100, values), expected)
    plain = W.timestep_weights(W.WeightOptions("flow"), snr, sigma, sigma, bins, 30, 100)
    assert plain.tolist() == [1.0] * len(plain)


def test_loss_curve_offset():
    frac = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    w = W.loss_curve_offset_weight(frac, 0, 100, 0.5)
    s6 = 1 / (1 + math.exp(6))  # sigmoid(−6)
    assert w.tolist() == pytest.approx([1 - 2 * 0.5 * (s6 - 0.5), 1.0, 1 - 2 * 0.5 * (0.5 - s6)])
    assert w[0] > 1 > w[2]  # positive scale: more loss at low noise, less at high noise
    # schedule: c = 0.5 + (−1)·50/100 = 0 at mid-training: no effect
    assert W.loss_curve_offset_weight(frac, 50, 100, 0.5, -1.0).tolist() == pytest.approx([1.0] * 3)


def test_loss_map_offset():
    values = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2
    bins = torch.tensor([0, 1, 2])
    assert W.loss_map_offset_weight(values, bins, 0, 100).tolist() == pytest.approx([0.5, 1.0, 1.5])  # a = 1
    assert W.loss_map_offset_weight(values, bins, 50, 100).tolist() == pytest.approx([0.75, 1.0, 1.25])  # a = 0.5
    assert W.loss_map_offset_weight(values, bins, 100, 100).tolist() == pytest.approx([1.0, 1.0, 1.0])  # a = 0
    assert W.loss_map_offset_weight(torch.ones(4), bins, 0, 100).tolist() == [1.0, 1.0, 1.0]  # flat map


# ------------------------------------------------------------------------------------------------------------ issue 14
@pytest.mark.parametrize("t_range", [(0, 1000), (300, 700), (0, 100), (950, 1000)])
def test_loss_map_offset_is_exactly_one_for_a_constant_loss_in_any_range(t_range):
    """A constant loss of 0.1 on t in [t_min, t_max) makes the map 0.1 over the trained bins; outside it stays 1.0.
    The offset's mean is taken over the trained bins, so every trained sample's weight is exactly 1 (the old
    all-bins mean gave 0.16 at step 0 for [300, 700))."""
    from library.loss_map import LossMap

    t_min, t_max = t_range
    loss_map = LossMap(1000)
    trained = torch.zeros(1000, dtype=torch.bool)
    trained[t_min:t_max] = True
    bins = torch.arange(t_min, t_max)
    for _ in range(40):  # every trained bin converges to 0.1 (rate 0.5: 2^-40)
        loss_map.update(bins, torch.full((bins.numel(),), 0.1))
    assert not torch.allclose(loss_map.values, torch.full((1000,), 0.1)) or t_range == (0, 1000)
    for step in (0, 37, 99):
        w = W.loss_map_offset_weight(loss_map.values, bins, step, 100, trained)
        torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-6, atol=0)
    if t_range == (300, 700):  # what the old statistic did
        old = W.loss_map_offset_weight(loss_map.values, bins, 0, 100)
        assert float(old[0]) == pytest.approx(0.16, abs=0.005)  # the figure (neighbours outside move too)


def test_snr_weighting_oracles():
    snr = torch.tensor([0.0, 0.5, 1.0, 4.0, 100.0], dtype=torch.float64)
    # snr: x0-space SNR = plain ε loss
    assert W.snr_weight(snr, "snr", 1.0, "epsilon").tolist() == [1.0] * 5
    assert W.snr_weight(snr, "snr", 1.0, "v_prediction").tolist() == pytest.approx([0.0, 1 / 3, 0.5, 0.8, 100 / 101])
    assert W.snr_weight(snr, "snr", 1.0, "flow_x0").tolist() == pytest.approx(snr.tolist())
    # max_snr γ = 2: ε max(1, γ/SNR) (SNR' floor 1e-8 at 0), v max(SNR, γ)/(SNR + 1)
    assert W.snr_weight(snr, "max_snr", 2.0, "epsilon").tolist() == pytest.approx([2e8, 4.0, 2.0, 1.0, 1.0])
    assert W.snr_weight(snr, "max_snr", 2.0, "v_prediction").tolist() == pytest.approx([2.0, 2 / 1.5, 1.0, 0.8, 100 / 101])
    sigma = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)  # SNR 0, 1, 16
    assert W.snr_weight(flow_snr(sigma), "snr", 1.0, "flow", sigma).tolist() == pytest.approx([0.0, 0.25, 0.64])
    assert W.snr_weight(flow_snr(sigma), "max_snr", 2.0, "flow", sigma).tolist() == pytest.approx([2.0, 0.5, 0.64])
    opts = W.WeightOptions("epsilon", snr_weighting="max_snr", max_snr_gamma=2.0)
    w = W.timestep_weights(opts, snr, None, snr, torch.zeros(5, dtype=torch.long), 0, 100)
    assert w.tolist() == pytest.approx([W.MAX_TIMESTEP_WEIGHT, 4.0, 2.0, 1.0, 1.0])  # bounded at SNR 0


@pytest.mark.parametrize("snr_table", [SNR, ZT_SNR], ids=["sd", "zero_terminal_snr"])
def test_no_configuration_exceeds_the_documented_bound(snr_table):
    """Every combination of the ε / v weights, at every t (zero terminal SNR included), stays ≤ 1000; without
    the bound zero terminal SNR reached 1e4 (debiased) and 1e12 (debiased · v_pred_like)."""
    t = torch.arange(1000)
    raw_max = 0.0
    for prediction, extra in (("epsilon", dict(v_pred_like_loss=1.0)), ("v_prediction",
                                                                          dict(scale_v_pred_loss_like_noise_pred=True))):
        for debiased in (False, True):
            for snr_weighting in (None, "max_snr"):
                opts = W.WeightOptions(prediction, debiased_estimation_loss=debiased, snr_weighting=snr_weighting,
                                       **extra)
                w = W.timestep_weights(opts, snr_table, None, t / 1000, t, 0, 100)
                assert torch.isfinite(w).all() and float(w.max()) <= W.MAX_TIMESTEP_WEIGHT
        raw_max = max(raw_max, float((W.debiased_weight(snr_table, "epsilon") * W.v_pred_like_weight(snr_table, 1.0)).max()))
    if snr_table is ZT_SNR:
        assert raw_max > 1e11  # what the bound prevents
    else:
        assert raw_max < W.MAX_TIMESTEP_WEIGHT * 4  # SD's own schedule: 14.6 · 215 ≈ 3140 at t = 999
    for scheme in ("sigma_sqrt", "cosmap"):
        for prediction in ("flow", "flow_x0"):
            opts = W.WeightOptions(prediction, weighting_scheme=scheme, debiased_estimation_loss=True,
                                   snr_weighting="snr")
            w = W.timestep_weights(opts, flow_snr(SIGMA), SIGMA, SIGMA, torch.arange(1000), 0, 100)
            assert torch.isfinite(w).all() and float(w.max()) <= W.MAX_TIMESTEP_WEIGHT

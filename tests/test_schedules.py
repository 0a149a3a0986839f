"""Schedules: ᾱ, zero terminal SNR, SNR, u -> t / σ, shift, bins (spec §0)."""
import pytest
import torch

from library import schedules as S


def test_sd_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(S.sd_alphas_cumprod().float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    linear = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    cfg = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
    torch.testing.assert_close(S.alphas_cumprod_from_config(cfg).float(), linear.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = S.betas_for("scaled_linear", S.SD_BETA_START, S.SD_BETA_END, 1000)
    ref = torch.cumprod(1 - rescale_zero_terminal_snr(betas.float()).double(), 0)
    ours = S.rescale_zero_terminal_snr(S.sd_alphas_cumprod())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)
    assert float(ours[-1]) == 0.0
    assert float(ours[0]) == pytest.approx(float(S.sd_alphas_cumprod()[0]), rel=1e-12)  # ᾱ_0 unchanged
    torch.testing.assert_close(S.rescale_zero_terminal_snr(ours), ours)  # idempotent


def test_snr_tables():
    ab = torch.tensor([0.99915, 0.5, 0.0], dtype=torch.float64)
    assert S.snr_from_alphas_cumprod(ab).tolist() == pytest.approx([0.99915 / 0.00085, 1.0, 0.0])
    assert S.flow_snr(torch.tensor([0.5, 0.25, 1.0])).tolist() == pytest.approx([1.0, 9.0, 0.0])


def test_ddpm_integer_mapping_and_ranges():
    sched = S.DDPMSchedule(S.sd_alphas_cumprod())
    full = S.TimestepRange()
    u = torch.tensor([0.0, 0.0005, 0.001, 0.5, 0.9999, 1 - 1e-12], dtype=torch.float64)
    assert sched.timesteps_from_u(u, full).tolist() == [0, 0, 1, 500, 999, 999]
    # a fine uniform grid hits every t of [t_min, t_max) equally often
    grid = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    for t_min, t_max in [(0, 1000), (200, 800), (0, 1), (999, 1000), (100, 250)]:
        t = sched.timesteps_from_u(grid, S.TimestepRange(t_min, t_max))
        assert int(t.min()) == t_min and int(t.max()) == t_max - 1
        counts = torch.bincount(t - t_min)
        assert counts.numel() == t_max - t_min and int(counts.max() - counts.min()) <= 1
    with pytest.raises(ValueError):
        S.TimestepRange(500, 500)


def test_shift_function():
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert float(S.shift(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)  # s/(1 + s) at x = 1/2
    torch.testing.assert_close(S.shift(x, 1.0), x)
    torch.testing.assert_close(S.shift(S.shift(x, 3.0), 1 / 3.0), x)      # S_{1/s} inverts S_s
    assert torch.all(S.shift(x, 3.0) >= x)                                # s > 1 moves mass to high noise


def test_flow_sigma_mapping():
    sched = S.FlowSchedule(shift=3.0)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999], dtype=torch.float64)
    sigma = sched.sigmas_from_u(u, S.TimestepRange())
    assert float(sigma[0]) == pytest.approx(1e-3)           # clamped to 1/T
    assert float(sigma[2]) == pytest.approx(0.75)
    assert float(sigma[1]) == pytest.approx(3 * 0.25 / (1 + 2 * 0.25))
    assert sched.timesteps(sigma).tolist() == pytest.approx((1000 * sigma).tolist())
    assert sched.bins(torch.tensor([1e-3, 0.0015, 0.5, 0.9999, 1.0], dtype=torch.float64)).tolist() == [1, 1, 500, 999, 999]
    ranged = S.FlowSchedule(1.0).sigmas_from_u(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), S.TimestepRange(200, 600))
    assert ranged.tolist() == pytest.approx([0.2, 0.4, 0.6])


@pytest.mark.parametrize("schedule, t_min, t_max", [
    (S.DDPMSchedule(S.sd_alphas_cumprod()), 0, 1000), (S.DDPMSchedule(S.sd_alphas_cumprod()), 150, 700),
    (S.FlowSchedule(1.0), 0, 1000), (S.FlowSchedule(3.0), 0, 1000), (S.FlowSchedule(0.5), 100, 900)])
def test_bin_edges_agree_with_the_mapping(schedule, t_min, t_max):
    rng = S.TimestepRange(t_min, t_max)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if schedule.kind == "ddpm":
        bins = schedule.bins(schedule.timesteps_from_u(u, rng))
    else:
        bins = schedule.bins(schedule.sigmas_from_u(u, rng))
    edges = schedule.bin_edges_u(rng)
    from_edges = torch.searchsorted(edges, u, right=True) - 1
    # the bin an edge interval claims is the bin the mapping gives (fp rounding at an exact edge aside)
    assert float((from_edges == bins).double().mean()) > 0.9995
    assert float(edges[0]) == 0.0 and float(edges[-1]) == 1.0 and torch.all(edges[1:] >= edges[:-1])

"""LossMetrics: the normalised loss ignores which timesteps a batch drew, band EMAs converge to the band means of
the per-timestep loss, the heatmap renders, state round-trips, flags are checked."""
import argparse

import numpy as np
import pytest
import torch

from library.errors import UserError
from library.metrics import (LossMetrics, add_metric_arguments, band_of, debiased_ema_update, gathered_samples,
                             histogram_raw_kwargs, nearest_seen, validate_metric_options)


def f(t: torch.Tensor) -> torch.Tensor:
    """A per-timestep loss shaped like ε-prediction MSE: 26× larger at t = 0 than at t = 999."""
    return 0.02 + 0.5 * torch.exp(-t.double() / 120.0)


def draw(generator, n, low=0, high=1000):
    return torch.randint(low, high, (n,), generator=generator)


def noisy(losses, generator, cv=0.3):
    """Multiplicative per-sample noise with mean 1 (a Gamma of shape 1/cv²), as per-sample losses scatter."""
    shape = 1.0 / cv**2
    gamma = torch.distributions.Gamma(torch.full_like(losses, shape), torch.full_like(losses, shape))
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    return losses * gamma.sample()


# ------------------------------------------------------------------------------------------------------------ math
def test_debiased_ema_oracle():
    # r = 0.5 from nothing: L = 2 -> S = 1, W = 0.5, E = 2 (no pull towards 0); then L = 4 -> the latest sample
    # weighs 0.5, the first 0.25: E = (0.5·4 + 0.25·2)/0.75 = 10/3.
    S, W = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    debiased_ema_update(S, W, 2 * one, one, 0.5)
    assert (S / W).item() == pytest.approx(2.0)
    debiased_ema_update(S, W, 4 * one, one, 0.5)
    assert (S / W).item() == pytest.approx(10 / 3)
    # n equal samples in one batch == n sequential updates
    S2, W2 = S.clone(), W.clone()
    debiased_ema_update(S, W, 3 * 5 * one, 3 * one, 0.5)
    for _ in range(3):
        debiased_ema_update(S2, W2, 5 * one, one, 0.5)
    assert torch.allclose(S, S2) and torch.allclose(W, W2)


def test_nearest_seen_and_bands():
    values = torch.tensor([0.0, 7.0, 0.0, 0.0, 0.0, 9.0, 0.0])
    seen = torch.tensor([False, True, False, False, False, True, False])
    assert nearest_seen(values, seen).tolist() == [7, 7, 7, 7, 9, 9, 9]  # index 3 is equidistant: the lower side
    assert torch.isnan(nearest_seen(values, torch.zeros(7, dtype=torch.bool))).all()
    assert band_of(torch.tensor([0, 99, 100, 555, 999])).tolist() == [0, 0, 1, 5, 9]


def test_first_samples_are_their_own_reference_and_unseen_bins_borrow_the_nearest():
    m = LossMetrics()
    assert m.normalized(torch.tensor([10, 900]), torch.tensor([0.5, 0.1])).tolist() == [1.0, 1.0]
    m.observe(torch.tensor([10]), torch.tensor([0.5]))
    assert m.step_logs(1)["loss/normalized"] == pytest.approx(1.0)
    # bin 900 lies far beyond the kernel of bin 10: it borrows bin 10's value 0.5 -> ratio 0.1/0.5
    assert m.normalized(torch.tensor([900]), torch.tensor([0.1])).item() == pytest.approx(0.2)
    m.observe(torch.tensor([10, 20]), torch.tensor([float("nan"), 0.5]))  # NaN dropped, not poisoning the EMA
    assert torch.isfinite(m.fine_estimate()).all()


# ------------------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("cv", [0.0, 0.3])
def test_normalised_loss_is_one_whatever_the_batch_drew(cv):
    g = torch.Generator().manual_seed(0)
    m = LossMetrics()
    batch = 8

    def run_phase(steps, low, high):
        raws, normals = [], []
        for _ in range(steps):
            bins = draw(g, batch, low, high)
            losses = f(bins) if cv == 0 else noisy(f(bins), g, cv)
            m.observe(bins, losses)
            normals.append(m.step_logs(0)["loss/normalized"])
            raws.append(losses.mean().item())
        return np.mean(raws), np.mean(normals), np.array(normals)

    run_phase(400, 0, 1000)                       # warm-up: the map learns f(t)
    raw_low, norm_low, per_step_low = run_phase(60, 0, 200)       # only low noise: hard batches
    raw_high, norm_high, per_step_high = run_phase(60, 800, 1000)  # only high noise: easy batches
    assert raw_low / raw_high > 5                 # the raw curve jumps by the draw...
    assert norm_low == pytest.approx(1.0, abs=0.03)   # ...the normalised one does not
    assert norm_high == pytest.approx(1.0, abs=0.03)
    if cv == 0:  # without sampling noise every single step is within a few %
        assert np.abs(np.concatenate([per_step_low, per_step_high]) - 1).max() < 0.04


def test_normalised_loss_drops_below_one_when_the_model_improves():
    g = torch.Generator().manual_seed(1)
    m = LossMetrics()
    for _ in range(300):
        bins = draw(g, 8)
        m.observe(bins, f(bins))
        m.step_logs(0)
    bins = draw(g, 8)
    m.observe(bins, 0.8 * f(bins))                # 20% better at every noise level
    assert m.step_logs(0)["loss/normalized"] == pytest.approx(0.8, abs=0.02)


def test_band_emas_converge_to_the_band_means_of_f():
    g = torch.Generator().manual_seed(2)
    m = LossMetrics(band_rate=0.005, heatmap_every=50)  # ≈ 400 samples per estimate: ~1% sampling error
    for step in range(1, 801):
        bins = draw(g, 16)
        m.observe(bins, f(bins))
        logs = m.step_logs(step)
    expected = f(torch.arange(1000)).reshape(10, 100).mean(1)
    got = torch.tensor([logs[f"loss/timestep_bin/{j:02d}"] for j in range(10)], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=0.03), (got, expected)
    counts, edges = m.timestep_histogram()
    assert counts.sum() == 800 * 16 and edges.tolist() == list(range(0, 1001, 100))
    assert counts.min() > 0.8 * 1280 and m.timestep_histogram()[0].sum() == 0  # window reset
    raw = histogram_raw_kwargs(counts, edges)
    assert raw["num"] == 12800 and raw["bucket_counts"] == counts.tolist() and raw["max"] == 1000


def test_band_ema_of_a_batch_covering_every_bin_is_the_band_mean_at_once():
    m = LossMetrics()
    bins = torch.arange(1000)
    m.observe(bins, f(bins))
    assert torch.allclose(m.band_estimate(), f(bins).reshape(10, 100).mean(1))


def test_heatmap_rows_and_image():
    g = torch.Generator().manual_seed(3)
    m = LossMetrics(heatmap_every=10)
    for step in range(1, 101):
        bins = draw(g, 4)
        m.observe(bins, f(bins) * (1 - step / 200))  # improving over time
        m.step_logs(step)
    steps, rows = m.heatmap_array()
    assert steps.tolist() == list(range(10, 101, 10)) and rows.shape == (10, 10)
    assert rows[-1, 0] < rows[0, 0] and rows[0, 0] > rows[0, 9]   # falls with steps, falls with noise
    for relative in (False, True):
        image = m.heatmap_image(relative=relative, width=6.4, height=4.0, dpi=50)
        assert image.shape == (200, 320, 3) and image.dtype == np.uint8
        assert image.std() > 10                    # something is drawn
    assert LossMetrics().heatmap_image(dpi=50).shape == (200, 320, 3)  # empty: axes only, no error


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(4)
    a = LossMetrics(heatmap_every=5)
    for step in range(1, 21):
        bins = draw(g, 4)
        a.observe(bins, f(bins))
        a.step_logs(step)
    b = LossMetrics(heatmap_every=5)
    b.load_state_dict(a.state_dict())
    bins = draw(g, 4)
    for metrics in (a, b):
        metrics.observe(bins, f(bins))
    assert a.step_logs(25) == b.step_logs(25)
    assert np.array_equal(a.heatmap_array()[1], b.heatmap_array()[1], equal_nan=True) and len(b.heatmap_steps) == 5
    with pytest.raises(UserError, match="bins"):
        LossMetrics(num_bins=500).load_state_dict(a.state_dict())


def test_gathered_samples_drop_the_padding_of_a_shorter_rank():
    other_bins, other_losses = torch.tensor([7]), torch.tensor([0.7])  # rank 1 holds one sample, rank 0 two

    def gather(tensor):  # rank 0's view of accelerator.gather: its tensor, then rank 1's padded one
        if tensor.numel() == 1:
            return torch.cat([tensor, torch.tensor([1])])
        other = other_bins if tensor.dtype == torch.long else other_losses
        return torch.cat([tensor, torch.nn.functional.pad(other, (0, 1), value=-1 if tensor.dtype == torch.long else 0)])

    bins, losses = gathered_samples(torch.tensor([3, 5]), torch.tensor([0.3, 0.5]), gather)
    assert bins.tolist() == [3, 5, 7] and losses.tolist() == pytest.approx([0.3, 0.5, 0.7])
    assert gathered_samples(torch.tensor([3]), torch.tensor([0.3]), None)[0].tolist() == [3]


# ------------------------------------------------------------------------------------------------------------ flags
def parse(*argv):
    parser = argparse.ArgumentParser()
    add_metric_arguments(parser)
    return parser.parse_args(list(argv))


def test_flag_defaults_and_checks():
    args = parse()
    assert (args.heatmap_every_n_steps, args.validation_timesteps, args.validation_split) == (50, 10, 0.0)  # KS: 0.0
    validate_metric_options(args)
    validate_metric_options(parse("--validation_split", "0.2", "--validate_every_n_steps", "10"))
    for argv, flag in [(("--heatmap_every_n_steps", "0"), "--heatmap_every_n_steps"),
                       (("--validation_split", "1.0"), "--validation_split"),
                       (("--validation_split", "-0.1"), "--validation_split"),
                       (("--validate_every_n_steps", "0"), "--validate_every_n_steps"),
                       (("--validation_timesteps", "0"), "--validation_timesteps"),
                       (("--validation_timesteps", "1001"), "--validation_timesteps"),
                       (("--validate_every_n_epochs", "1"), "--validation_split 0.1")]:
        with pytest.raises(UserError, match=flag):
            validate_metric_options(parse(*argv))

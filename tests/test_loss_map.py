"""Timestep Attention loss map (spec §5): update oracle, compression, sampling, weights,
state and files."""
import pytest
import torch
from scipy.stats import chisquare

from library.errors import UserError
from library.loss_map import NEIGHBOUR_WEIGHTS, LossMap, compress, gathered_update


def reference_update(values: list[float], bins, losses, rate: float = 0.5) -> list[float]:
    """The spec §5 rule written out scalar by scalar, as an independent oracle for the windowed update."""
    m = list(values)
    for b, loss in zip(bins, losses):
        m_old = m[b]
        m[b] += rate * (loss - m_old)
        for k, w in enumerate(NEIGHBOUR_WEIGHTS, start=1):
            for a in (b - k, b + k):
                if 0 <= a < len(m):
                    m[a] += rate * ((1 - w) * loss + w * m_old - m[a])
    return m


def test_update_oracle_from_flat_map():
    loss_map = LossMap()
    loss_map.update(torch.tensor([500]), torch.tensor([0.2]))
    m = loss_map.values
    expected = {500: 0.6, 499: 0.604, 501: 0.604, 498: 0.612, 502: 0.612, 494: 0.8, 506: 0.8, 493: 1.0, 507: 1.0}
    for b, value in expected.items():
        assert m[b].item() == pytest.approx(value, abs=1e-6), b
    # k = 3, 4, 5: w = 0.09, 0.25, 0.35 -> 1 + 0.5·((1 − w)·0.2 + w − 1)
    assert m[497].item() == pytest.approx(0.636, abs=1e-6)
    assert m[496].item() == pytest.approx(0.7, abs=1e-6)
    assert m[495].item() == pytest.approx(0.74, abs=1e-6)
    assert (m[:493] == 1).all() and (m[508:] == 1).all()


def test_update_is_sequential_and_matches_the_scalar_rule_at_the_edges():
    generator = torch.Generator().manual_seed(0)
    # overlapping neighbourhoods (490..510) and both ends of the range, where the window is clipped
    bins = torch.cat([torch.randint(490, 511, (40,), generator=generator), torch.tensor([0, 3, 999, 995, 1])])
    losses = torch.rand(bins.numel(), generator=generator) * 2
    loss_map = LossMap()
    loss_map.update(bins, losses)
    expected = reference_update([1.0] * 1000, bins.tolist(), losses.tolist())
    assert torch.allclose(loss_map.values.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-6)
    # order matters: the same pairs applied in reverse give another map
    reversed_map = LossMap()
    reversed_map.update(bins.flip(0), losses.flip(0))
    assert (reversed_map.values - loss_map.values).abs().max() > 1e-3


def test_update_rate_and_validation():
    loss_map = LossMap(update_rate=1.0)
    loss_map.update(torch.tensor([10]), torch.tensor([0.3]))
    assert loss_map.values[10].item() == pytest.approx(0.3)
    assert loss_map.values[16].item() == pytest.approx(0.5 * 0.3 + 0.5 * 1.0)  # w_6 = 0.5 at r = 1
    with pytest.raises(UserError, match="--loss_map_update_rate"):
        LossMap(update_rate=0.0)
    with pytest.raises(ValueError, match="bins must lie"):
        loss_map.update(torch.tensor([1000]), torch.tensor([0.1]))


def test_non_finite_losses_leave_the_map_untouched():
    loss_map = LossMap()
    loss_map.update(torch.tensor([100, 200, 300]), torch.tensor([float("nan"), 0.2, float("inf")]))
    assert torch.isfinite(loss_map.values).all()
    assert loss_map.values[100].item() == 1.0 and loss_map.values[300].item() == 1.0
    assert loss_map.values[200].item() == pytest.approx(0.6)


def test_compress_oracle_keeps_the_sum():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    compressed = compress(values, p=0.05)
    # hand-derived in compress()'s docstring: [1.05, 2.05, 3, 5.7]·12/11.8
    assert torch.allclose(compressed, torch.tensor([1.0677966, 2.0847458, 3.0508475, 5.7966102], dtype=torch.float64),
                          atol=1e-6)
    assert compressed.sum().item() == pytest.approx(12.0, abs=1e-12)
    flat = compress(torch.full((1000,), 0.7))
    assert torch.allclose(flat, torch.full((1000,), 0.7, dtype=torch.float64), atol=1e-12)


def sloped_map() -> LossMap:
    loss_map = LossMap()
    loss_map.values.copy_(torch.linspace(0.2, 2.0, 1000))
    return loss_map


def test_sampling_probs_mix_exactly():
    loss_map = sloped_map()
    base = torch.linspace(2.0, 1.0, 1000)  # any positive density, unnormalised
    mix = 0.1
    probs = loss_map.sampling_probs(base, mix)
    attention = compress(loss_map.values)
    expected = (1 - mix) * attention / attention.sum() + mix * base.double() / base.double().sum()
    assert probs.dtype == torch.float64 and probs.shape == (1000,)
    assert torch.allclose(probs, expected, rtol=1e-12, atol=0)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # λ = 1 is the base sampler, λ = 0 the compressed map alone
    assert torch.allclose(loss_map.sampling_probs(base, 1.0), base.double() / base.double().sum(), rtol=1e-12)
    assert torch.allclose(loss_map.sampling_probs(base, 0.0), attention / attention.sum(), rtol=1e-12)
    with pytest.raises(UserError, match="--loss_map_mix"):
        loss_map.sampling_probs(base, 1.5)


def test_sampling_probs_stay_on_the_base_support():
    loss_map = sloped_map()
    base = torch.zeros(1000)
    base[100:900] = 1.0  # e.g. --min_timestep 100 --max_timestep 900
    probs = loss_map.sampling_probs(base, 0.1)
    assert probs[:100].sum() == 0 and probs[900:].sum() == 0
    assert probs[100:900].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_sampled_bins_follow_the_map():
    loss_map = sloped_map()
    probs = loss_map.sampling_probs(torch.ones(1000), 0.1)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    bins = loss_map.sample_bins(uniforms, probs)
    assert bins.dtype == torch.long and bins.shape == (20000,) and 0 <= bins.min() and bins.max() < 1000
    observed = torch.bincount(bins // 100, minlength=10).double()
    expected = probs.double().reshape(10, 100).sum(1) * 20000
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # the test has power: the same draws are far from uniform sampling
    assert chisquare(observed.numpy(), torch.full((10,), 2000.0).numpy()).pvalue < 1e-6


def test_sample_bins_inverse_cdf_edges_and_zero_bins():
    loss_map = LossMap(num_bins=16)
    probs = torch.zeros(16)
    probs[[2, 5, 15]] = torch.tensor([0.25, 0.5, 0.25])
    bins = loss_map.sample_bins(torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999999]), probs)
    assert bins.tolist() == [2, 2, 5, 5, 15, 15]
    # monotone in U: a slice of U (stratum, cluster) is a quantile slice of P
    uniforms = torch.rand(1000, generator=torch.Generator().manual_seed(5))
    drawn = sloped_map().sample_bins(uniforms, sloped_map().sampling_probs(torch.ones(1000), 0.1))
    assert (drawn[uniforms.argsort()].diff() >= 0).all()


def test_importance_weights_make_the_objective_the_base_one():
    loss_map = sloped_map()
    base = torch.distributions.Beta(2.0, 3.0).log_prob(torch.linspace(0.0005, 0.9995, 1000)).exp()
    probs = loss_map.sampling_probs(base, 0.1)
    # a loss that rises with the bin, like the map, so the map-biased sampler over-weights high losses
    noise = torch.rand(1000, generator=torch.Generator().manual_seed(3)).double() * 0.2
    per_bin_loss = torch.linspace(0.5, 1.5, 1000, dtype=torch.float64) + noise
    all_bins = torch.arange(1000)
    weights = LossMap.importance_weights(all_bins, probs, base).double()
    p, p_base = probs.double() / probs.double().sum(), base.double() / base.double().sum()
    # exact, by summation over bins: E_P[w·L] = E_base[L]
    assert (p * weights * per_bin_loss).sum().item() == pytest.approx((p_base * per_bin_loss).sum().item(), rel=1e-6)
    # and by Monte Carlo through the sampler
    draws = loss_map.sample_bins(torch.rand(50000, generator=torch.Generator().manual_seed(4)), probs)
    weighted = LossMap.importance_weights(draws, probs, base).double() * per_bin_loss[draws]
    assert weighted.mean().item() == pytest.approx((p_base * per_bin_loss).sum().item(), rel=0.01)
    # unweighted, the map-biased sampler gives another objective (the weights matter)
    assert abs(per_bin_loss[draws].mean().item() - (p_base * per_bin_loss).sum().item()) > 0.05


def test_state_dict_round_trip_is_a_copy():
    loss_map = LossMap()
    loss_map.update(torch.tensor([10, 500, 990]), torch.tensor([0.1, 0.3, 2.0]))
    state = loss_map.state_dict()
    restored = LossMap()
    restored.load_state_dict(state)
    assert torch.equal(restored.values, loss_map.values)
    loss_map.update(torch.tensor([500]), torch.tensor([5.0]))
    assert torch.equal(state["values"], restored.values)  # the saved state did not follow the live map
    with pytest.raises(UserError, match="shape"):
        LossMap().load_state_dict({"values": torch.ones(999)})


def test_save_file_load_file_csv_png(tmp_path):
    from safetensors.torch import load_file

    loss_map = LossMap()
    loss_map.update(torch.tensor([3, 700]), torch.tensor([0.25, 1.75]))
    path = str(tmp_path / "map.safetensors")
    loss_map.save_file(path)
    tensors = load_file(path)
    assert list(tensors) == ["loss_map"] and tensors["loss_map"].shape == (1000,)
    restored = LossMap()
    restored.load_file(path)
    assert torch.equal(restored.values, loss_map.values)

    loss_map.to_csv(str(tmp_path / "map.csv"))
    lines = (tmp_path / "map.csv").read_text().splitlines()
    assert lines[0] == "bin,loss" and len(lines) == 1001
    assert lines[704].split(",") == ["703", f"{loss_map.values[703].item():.9g}"]
    assert float(lines[4].split(",")[1]) == pytest.approx(loss_map.values[3].item())

    loss_map.to_png(str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from safetensors.torch import save_file
    save_file({"other": torch.ones(1000)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="no tensor named 'loss_map'"):
        restored.load_file(str(tmp_path / "bad.safetensors"))


def test_gathered_update_single_process_and_uneven_fake_ranks():
    bins, losses = torch.tensor([5, 6, 7]), torch.tensor([0.1, 0.2, 0.3])
    alone, direct = LossMap(), LossMap()
    gathered_update(alone, bins, losses, gather=None)
    direct.update(bins, losses)
    assert torch.equal(alone.values, direct.values)

    # Two fake ranks with 3 and 1 samples: a gather that concatenates this rank's tensor with the other's,
    # as accelerate.gather does for rank 0. The pad entry of the short rank must not reach the map.
    other = iter([torch.tensor([1]), torch.tensor([8, -1, -1]), torch.tensor([0.9, 0.0, 0.0])])

    def gather_as_rank0(tensor):
        return torch.cat([tensor, next(other).to(tensor.dtype)])

    two_ranks, sequential = LossMap(), LossMap()
    gathered_update(two_ranks, bins, losses, gather=gather_as_rank0)
    sequential.update(torch.tensor([5, 6, 7, 8]), torch.tensor([0.1, 0.2, 0.3, 0.9]))
    assert torch.equal(two_ranks.values, sequential.values)


def test_sampling_probs_compress_over_the_reachable_bins_only():
    """Bins outside --min_timestep/--max_timestep stay at 1.0; the compression's mean/max/min are taken over the
    reachable bins, so a map trained to a constant there gives exactly the base sampler's probabilities."""
    loss_map = LossMap(1000)
    loss_map.values[300:700] = 0.1
    base = torch.zeros(1000)
    base[300:700] = 1.0
    probs = loss_map.sampling_probs(base, 0.1)
    torch.testing.assert_close(probs, base.double() / 400, rtol=1e-12, atol=0)


def test_loss_map_files_round_trip(tmp_path):
    loss_map = LossMap(1000)
    loss_map.update(torch.tensor([10, 500]), torch.tensor([0.2, 3.0]))
    loss_map.to_csv(str(tmp_path / "m.csv"))
    loss_map.save_file(str(tmp_path / "m.safetensors"))
    for name in ("m.csv", "m.safetensors"):
        other = LossMap(1000)
        other.load_any(str(tmp_path / name))
        torch.testing.assert_close(other.values, loss_map.values, rtol=1e-8, atol=0)
    (tmp_path / "bad.csv").write_text("bin,loss\n0,1\n")
    with pytest.raises(UserError, match="--loss_map_init: .*999 of the 1000 bins"):
        LossMap(1000).load_any(str(tmp_path / "bad.csv"))

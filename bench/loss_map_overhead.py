"""What Timestep Attention adds to a training step: loss-map update + sampling, against a tiny model step.

    .venv/bin/python bench/loss_map_overhead.py [--repeats 200] [--no-model]

Prints one row per batch size (the gathered batch, all ranks): the map update (a host loop over samples, each
a 13-bin window op), the per-step sampling work (sampling_probs + sample_bins + importance_weights),
and, for scale, a tiny SD1.5 UNet (library/tiny_models.py) forward + backward at 32×32 latents, same batch.
Real models only make the map's share smaller: its cost does not depend on the model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.loss_map import LossMap  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (the minimum: other jobs on a shared machine
    only ever add time)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def map_costs(batch: int, repeats: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(batch)
    loss_map = LossMap()
    loss_map.update(torch.randint(0, 1000, (4000,), generator=generator), torch.rand(4000, generator=generator))
    bins = torch.randint(0, 1000, (batch,), generator=generator)
    losses = torch.rand(batch, generator=generator)
    uniforms = torch.rand(batch, generator=generator)
    base = torch.ones(1000)

    def sample():
        probs = loss_map.sampling_probs(base, 0.1)
        LossMap.importance_weights(loss_map.sample_bins(uniforms, probs), probs, base)

    return best_seconds(lambda: loss_map.update(bins, losses), repeats), best_seconds(sample, repeats)


def unet_step_seconds(unet: torch.nn.Module, batch: int, repeats: int) -> float:
    latents = torch.randn(batch, 4, 32, 32)
    text = torch.randn(batch, 77, 32)
    timesteps = torch.randint(0, 1000, (batch,))

    def step():
        unet(latents, timesteps, encoder_hidden_states=text).sample.square().mean().backward()

    return best_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per map measurement")
    parser.add_argument("--model_repeats", type=int, default=3, help="timed tiny-UNet steps per batch size")
    parser.add_argument("--no-model", action="store_true", help="skip the tiny UNet reference step")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a fair, quiet comparison on a shared machine

    unet = None
    if not args.no_model:
        from library.tiny_models import build_sd15

        unet = build_sd15(seed=0).unet
    print(f"torch {torch.__version__}, 1 thread; best of {args.repeats} calls (model: {args.model_repeats})")
    print("| batch | map update | sampling + importance weights | total | tiny SD1.5 UNet fwd+bwd 32×32 | map share |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (16, 64):
        update, sample = map_costs(batch, args.repeats)
        total = update + sample
        if args.no_model:
            model, share = "-", "-"
        else:
            seconds = unet_step_seconds(unet, batch, args.model_repeats)
            model, share = f"{seconds * 1e3:.1f} ms", f"{100 * total / seconds:.2f} %"
        print(f"| {batch} | {update * 1e6:.0f} µs | {sample * 1e6:.0f} µs | {total * 1e6:.0f} µs | {model} | {share} |")


if __name__ == "__main__":
    main()

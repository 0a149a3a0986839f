"""What the loss engine costs per micro-batch: sampling, noise, inputs, loss, weights, loss-map record.

    .venv/bin/python bench/engine_overhead.py [--batch 16] [--repeats 30] [--device cpu]

Latents are B×4×128×128 (a 1024² SDXL batch; SD3's 16 channels cost 4× in the elementwise columns). Each cell is
the median wall time of one call in ms. Target: the timestep weights (sample + weights) stay below 1 ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from library.engine import LossEngine
from library.loss_config import LossConfig

CONFIGS = [
    ("sd1 l2 (default)", "sd1", "epsilon", {}),
    ("sd1 huber snr + min_snr + debiased", "sd1", "epsilon",
     dict(loss_type="huber", min_snr_gamma=5.0, debiased_estimation_loss=True)),
    ("sdxl v-pred + min_snr + scale_v + curve offset", "sdxl", "v_prediction",
     dict(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, loss_curve_offset=0.2)),
    ("sd1 stratified + 10 clusters", "sd1", "epsilon", dict(stratified_timesteps=True, timestep_clusters=10)),
    ("sd1 noise offset + ip noise", "sd1", "epsilon", dict(noise_offset=0.05, ip_noise_gamma=0.1)),
    ("sd1 multires noise (6)", "sd1", "epsilon", dict(multires_noise_iterations=6)),
    ("sd3 logit_normal + cosmap", "sd3", "flow", dict(weighting_scheme="cosmap", timestep_sampling="logit_normal")),
    ("sd3 loss_map unbiased + offset", "sd3", "flow",
     dict(timestep_sampling="loss_map", loss_map_unbiased=True, loss_map_offset=True)),
    ("sd1 combined (spatial cosine)", "sd1", "epsilon", dict(loss_type="combined")),
    ("sd1 ew (experimental)", "sd1", "epsilon", dict(loss_type="ew")),
    ("sd1 clustered_mse (experimental)", "sd1", "epsilon", dict(loss_type="clustered_mse")),
]
COLUMNS = ("sample_levels", "sample_noise", "make_inputs", "loss", "weights", "record")


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench(family: str, prediction: str, options: dict, batch: int, repeats: int, device: str) -> dict[str, float]:
    kind = "flow" if family == "sd3" else "ddpm"
    cfg = LossConfig(family=family, prediction_type=prediction, **options)
    engine = LossEngine(cfg, kind, prediction, None, seed=0, rank=0, world_size=1, max_train_steps=1000)
    latents = torch.randn(batch, 4, 128, 128, device=device)
    levels = engine.sample_levels(0, batch, device=device)
    noise = engine.sample_noise(latents, 0)
    noisy, target = engine.make_inputs(latents, noise, levels)
    pred = target + 0.1 * torch.randn_like(target)
    result = engine.loss(pred, target, levels, 0, noisy=noisy)
    return {
        "sample_levels": median_ms(lambda: engine.sample_levels(3, batch, device=device), repeats),
        "sample_noise": median_ms(lambda: engine.sample_noise(latents, 3), repeats),
        "make_inputs": median_ms(lambda: engine.make_inputs(latents, noise, levels), repeats),
        "loss": median_ms(lambda: engine.loss(pred, target, levels, 3, noisy=noisy), repeats),
        "weights": median_ms(lambda: engine.timestep_weights(levels, 3), repeats),
        "record": median_ms(lambda: engine.record(result, levels), repeats),
    }


def tiny_step_ms(batch: int, device: str) -> float:
    """One training step of the tiny SD1.5 UNet (library/tiny_models) on the same latents: fwd + bwd + AdamW."""
    from library.tiny_models import build_sd15

    unet = build_sd15().unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    latents = torch.randn(batch, 4, 128, 128, device=device)
    cond = torch.randn(batch, 77, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        loss = torch.nn.functional.mse_loss(unet(latents, t, cond).sample, latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_ms(step, 1)  # one warm-up + one timed step: minutes at 128×128 latents on a CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--no_step", action="store_true", help="skip the tiny-model step reference")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives stable numbers on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"latents {args.batch}×4×128×128, median ms per call over {args.repeats} calls\n")
    name_width = max(len(name) for name, *_ in CONFIGS)
    step_ms = None if args.no_step else tiny_step_ms(args.batch, args.device)
    share_column = () if step_ms is None else ("% of step",)
    print(f"| {'config':<{name_width}} | " + " | ".join(f"{c:>13}" for c in COLUMNS + share_column) + " |")
    print(f"|{'-' * (name_width + 2)}|" + "|".join("-" * 15 for _ in COLUMNS + share_column) + "|")
    for name, family, prediction, options in CONFIGS:
        row = bench(family, prediction, options, args.batch, args.repeats, args.device)
        cells = [f"{row[c]:>13.3f}" for c in COLUMNS]
        if step_ms is not None:  # everything the engine adds to a step: sampling, noise, inputs, loss, weights
            cells.append(f"{100 * sum(row.values()) / step_ms:>12.2f}%")
        print(f"| {name:<{name_width}} | " + " | ".join(cells) + " |")
    if step_ms is not None:
        print(f"\ntiny SD1.5 UNet training step on the same {args.batch}×4×128×128 latents: {step_ms:.0f} ms "
              "(target: the engine under 2 % of it; the weights alone under 1 ms)")


if __name__ == "__main__":
    main()

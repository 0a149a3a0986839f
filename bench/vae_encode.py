"""Latent caching's cost: the full-size SD VAE encoder on one 256 px picture, NCHW against channels_last weights
(library/speed.vae_layout), fp32 and bf16, CPU seconds per picture, alternating layouts.

    .venv/bin/python bench/vae_encode.py [--threads 1] [--rounds 3] [--size 256]

The VAE has random weights in the SD1.5/SDXL shape (128/256/512/512 channels, two layers per block). The freed
heap is kept as in training (library/host_memory.py), so the figures are the trainer's. Prints a table with the
median of --rounds per layout and the largest difference between the two layouts' latents.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    import torch
    from diffusers import AutoencoderKL

    from library import host_memory

    torch.set_num_threads(args.threads)
    host_memory.keep_freed_memory_in_heap()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
    vae.eval().requires_grad_(False)
    picture = torch.rand(1, 3, args.size, args.size) * 2 - 1
    print(f"| dtype ({args.threads} thread(s), {args.size} px) | NCHW CPU s | channels_last CPU s | ratio | "
          "max latent difference (relative) |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        torch.nn.Module.to(vae, dtype=dtype)
        seconds: dict[str, list[float]] = {"nchw": [], "channels_last": []}
        latents = {}
        for _ in range(args.rounds):
            for layout, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                vae.to(memory_format=memory_format)
                with torch.no_grad():
                    vae.encode(picture.to(dtype))  # warm: oneDNN primitives for this layout
                    start = _cpu_seconds()
                    latents[layout] = vae.encode(picture.to(dtype)).latent_dist.mean.float()
                    seconds[layout].append(_cpu_seconds() - start)
        nchw, channels_last = statistics.median(seconds["nchw"]), statistics.median(seconds["channels_last"])
        difference = ((latents["channels_last"] - latents["nchw"]).abs().max() / latents["nchw"].abs().max()).item()
        print(f"| {str(dtype).removeprefix('torch.')} | {nchw:.3f} | {channels_last:.3f} | "
              f"{channels_last / nchw:.3f} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()

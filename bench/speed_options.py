"""Our trainer alone, one speed option at a time: CPU and wall seconds per step at fp32 eager, --channels_last,
--torch_compile (inductor), --mixed_precision bf16 and --return_freed_memory (glibc's malloc defaults), on an SD1.5-wide UNet with one layer per block.

    .venv/bin/python bench/speed_options.py [--threads 1] [--steps 8] [--warmup 3] [--variants eager compile ...]

The model is bench/step_overhead.py's SD1.5 shape (block widths 320/640/1280/1280, one layer per block, 32x32
latents from 256 px pictures), so a compile of forward + backward finishes in minutes on a CPU; the workload is
otherwise bench/vs_kohya.py's (LoRA dim 16 on the UNet and text encoder, AdamW, cached latents, batch 1). Each
variant runs in its own process; per-step CPU seconds come from /proc at each progress-bar update (vs_kohya's
measure), the first --warmup steps (the compile) dropped. Ratios are against eager: below 1 is faster.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {"eager": [], "channels_last": ["--channels_last"], "compile": ["--torch_compile"],
            "compile+channels_last": ["--torch_compile", "--channels_last"], "bf16": ["--mixed_precision", "bf16"],
            "return_freed_memory": ["--return_freed_memory"]}


def main() -> None:
    from bench.step_overhead import build_model
    from bench.vs_kohya import common_flags, measure, per_step, _write_pictures

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["eager", "return_freed_memory", "channels_last", "compile", "bf16"],
                        choices=list(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="speed_options_") as tmp:
        paths = {"model": os.path.join(tmp, "model"), "data": os.path.join(tmp, "data")}
        build_model("sd1", paths["model"])
        _write_pictures(os.path.join(paths["data"], "1_sks photo"), count=8, size=256)
        rows = {}
        for name in args.variants:
            flags = [f for f in common_flags(paths, os.path.join(tmp, "out_" + name), args.steps)
                     if f != "--sdpa"] + VARIANTS[name]
            if "--mixed_precision" in VARIANTS[name]:
                at = flags.index("--mixed_precision")
                del flags[at:at + 2]
                flags += VARIANTS[name][-2:]
            command = [sys.executable, os.path.join(ROOT, "train_network.py"), *flags]
            rows[name] = per_step(measure(command, ROOT, args.threads, os.path.join(tmp, name + ".log")), args.warmup)
            print(f"  {name}: {rows[name]['cpu']:.3f} cpu-s/step, {rows[name]['wall']:.3f} s/step, set-up "
                  f"{rows[name]['setup']:.1f} s", flush=True)
    base = rows.get("eager")
    print(f"\n| option ({args.threads} thread(s)) | CPU s / step | wall s / step | set-up s | CPU vs eager |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        ratio = f"{row['cpu'] / base['cpu']:.3f}" if base else "-"
        print(f"| {name} | {row['cpu']:.3f} | {row['wall']:.3f} | {row['setup']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()

"""Peak RSS of loading a single-file SD1.x checkpoint: streamed (tensor by tensor) vs the whole file first.

    .venv/bin/python bench/load_memory.py [--model /tmp/vs_kohya/sd15_random.safetensors]

Each load runs in its own process (`--mode streamed|eager`); the figure is the kernel's high-water mark of RSS
(ru_maxrss, wait4), so it is a measure, not a timing, and does not depend on other load on the machine. The
default model is bench/vs_kohya.py's workload (random full-size SD1.5, fp16 single file), built if missing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _load(model: str, mode: str) -> None:
    from library.families import loading
    from library.families.sd1 import ADAPTER, SD1Options

    if mode == "eager":
        original = loading.load_single_file_state_dict
        loading.load_single_file_state_dict = lambda path, allow_pickle=False, flag="", lazy=False: original(
            path, allow_pickle, flag or "--pretrained_model_name_or_path", lazy=False)
    models = ADAPTER.load(SD1Options(model))
    print(sum(p.numel() for p in models.denoiser.parameters()), "denoiser parameters")


def peak_rss_gib(model: str, mode: str) -> float:
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--model", model, "--mode", mode],
                               cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the {mode} load failed")
    return usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/vs_kohya/sd15_random.safetensors")
    parser.add_argument("--mode", choices=["streamed", "eager"], help="internal: load once in this process")
    args = parser.parse_args()
    if args.mode:
        _load(args.model, args.mode)
        return
    if not os.path.isfile(args.model):
        from bench.vs_kohya import build_workload

        args.model = build_workload(os.path.dirname(args.model))["model"]
    figures = {mode: peak_rss_gib(args.model, mode) for mode in ("eager", "streamed")}
    print(f"single-file load of {os.path.basename(args.model)} ({os.path.getsize(args.model) / 2**30:.2f} GiB): "
          f"peak RSS eager {figures['eager']:.2f} GiB, streamed {figures['streamed']:.2f} GiB "
          f"({figures['streamed'] / figures['eager']:.3f}x)")


if __name__ == "__main__":
    main()

"""Peak RSS of loading a full-size single-file checkpoint: streamed (tensor by tensor) vs the whole file first.

    .venv/bin/python bench/load_memory.py [--families sd1 sdxl sd3] [--weight_dtype fp32 bf16]
                                          [--workdir /tmp/stream_bench] [--margin_gib 2]

Files (random weights, fp16, written once and kept; each written one tensor at a time, so writing never holds
the model):
    sd1   /tmp/vs_kohya/sd15_random.safetensors      bench/vs_kohya.py's workload (SD1.5, LDM layout), built if missing
    sdxl  WORKDIR/sdxl_random.safetensors             configs/models/sdxl: UNet + CLIP-L + OpenCLIP-bigG + VAE (SAI)
    sd3   WORKDIR/sd3_medium_random.safetensors       configs/models/sd3: MMDiT + CLIP-L + CLIP-G + VAE, no T5 (SAI
                                                      layout, as sd3_medium_incl_clips.safetensors)

Each load runs in its own process (`--load FAMILY FILE MODE DTYPE`), one after another; the figure is the kernel's
high-water mark of the child's RSS (ru_maxrss from wait4), so it is a measure that does not depend on other load on
the machine. "load CPU s" is the child's user + system CPU time (its whole run: imports, building, reading,
casting), which contention for the cores inflates less than wall time; compare it only within one run. A load
whose expected peak (eager: file + models; streamed: models) would not fit in MemAvailable minus --margin_gib is
skipped and says so: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.memory import _available_bytes  # noqa: E402  (the same MemAvailable probe)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MODES = ("eager", "streamed")


# ----------------------------------------------------------------------------------------------
# Random full-size files, written tensor by tensor
# ----------------------------------------------------------------------------------------------
def _meta_modules(config_dir: str, classes: dict) -> dict:
    """{subfolder: module} built on the meta device from config_dir/subfolder/config.json (no memory)."""
    from accelerate import init_empty_weights

    modules = {}
    for subfolder, cls in classes.items():
        folder = os.path.join(config_dir, subfolder)
        with init_empty_weights(include_buffers=False):
            if cls.__module__.startswith("transformers"):
                modules[subfolder] = cls(cls.config_class.from_pretrained(folder, local_files_only=True))
            else:
                modules[subfolder] = cls.from_config(cls.load_config(folder, local_files_only=True))
    return modules


def _sdxl_layout() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.sdxl_convert import sdxl_to_sai

    m = _meta_modules(os.path.join(ROOT, "configs", "models", "sdxl"),
                      {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                       "text_encoder_2": CLIPTextModelWithProjection})
    return sdxl_to_sai(m["unet"], m["vae"], m["text_encoder"], m["text_encoder_2"])


def _sd3_layout() -> dict:
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from library.sd3_convert import sd3_pipeline_to_sai

    m = _meta_modules(os.path.join(ROOT, "configs", "models", "sd3"),
                      {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                       "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection})
    return sd3_pipeline_to_sai(SimpleNamespace(**m), include_t5=False)


def write_random_safetensors(layout: dict, path: str, seed: int = 0) -> None:
    """A .safetensors file with the names and shapes of `layout` (meta tensors), fp16 random values: biases 0, 1-D
    weights 1, others N(0, 1/fan_in). Written one tensor at a time (the format: 8-byte little-endian header length,
    JSON header, data), to a temporary name renamed at the end."""
    import torch

    header, offset = {}, 0
    for key, tensor in layout.items():
        size = tensor.numel() * 2
        header[key] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, tensor in layout.items():
            if key.endswith("bias"):
                values = torch.zeros(tensor.shape, dtype=torch.float16)
            elif tensor.dim() == 1:
                values = torch.ones(tensor.shape, dtype=torch.float16)
            else:
                fan_in = max(1, tensor.numel() // tensor.shape[0])
                values = (torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5).to(torch.float16)
            f.write(values.contiguous().numpy().tobytes())
    os.replace(path + ".part", path)


def model_file(family: str, workdir: str) -> str:
    """The family's random full-size file, written if missing."""
    if family == "sd1":
        path = "/tmp/vs_kohya/sd15_random.safetensors"
        if not os.path.isfile(path):
            from bench.vs_kohya import build_workload

            path = build_workload(os.path.dirname(path))["model"]
        return path
    path = os.path.join(workdir, {"sdxl": "sdxl_random.safetensors", "sd3": "sd3_medium_random.safetensors"}[family])
    if not os.path.isfile(path):
        os.makedirs(workdir, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        # in a child process: the freed random tensors would stay in this process's heap beside the loads
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write", family, path], cwd=ROOT, check=True)
    return path


# ----------------------------------------------------------------------------------------------
# One load per process
# ----------------------------------------------------------------------------------------------
def _load(family: str, path: str, mode: str, dtype_name: str) -> None:
    import contextlib

    import torch

    from library import families, streamed_load

    family_entry = families.get_family(family)
    opts = family_entry.options_class(path, weight_dtype=getattr(torch, DTYPES[dtype_name]))
    with streamed_load.whole_files() if mode == "eager" else contextlib.nullcontext():
        models = family_entry.adapter().load(opts)
    modules = [models.denoiser, models.vae, *models.text_encoders]
    print(sum(p.numel() for m in modules for p in m.parameters()), "parameters")


def _parameter_bytes(path: str) -> int:
    """Bytes of the file's tensors (the models hold the same count of values)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sum(end - begin for begin, end in (info["data_offsets"] for info in header.values()))


def measure(family: str, path: str, mode: str, dtype_name: str) -> tuple[float, float]:
    """(peak RSS GiB, CPU seconds) of one load in a child process."""
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--load", family, path, mode, dtype_name],
                               cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the {mode} {family} load failed")
    return usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime


def _gib(figure: tuple[float, float] | None) -> str:
    return f"{figure[0]:.2f} GiB" if figure else "skipped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", choices=("sd1", "sdxl", "sd3"), default=["sd1"])
    parser.add_argument("--weight_dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"],
                        help="dtype the models are loaded in (fp32: no mixed precision; bf16: --mixed_precision bf16)")
    parser.add_argument("--workdir", default="/tmp/stream_bench")
    parser.add_argument("--margin_gib", type=float, default=2.0, help="memory left free for others (GiB)")
    parser.add_argument("--load", nargs=4, metavar=("FAMILY", "FILE", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("FAMILY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_random_safetensors({"sdxl": _sdxl_layout, "sd3": _sd3_layout}[args.write[0]](), args.write[1])
        return
    if args.load:
        _load(*args.load)
        return
    rows = []
    for family in args.families:
        path = model_file(family, args.workdir)
        file_bytes = _parameter_bytes(path)
        for dtype_name in args.weight_dtype:
            models_bytes = file_bytes * (4 if dtype_name == "fp32" else 2) // 2
            figures = {}
            for mode in MODES:
                expected = models_bytes + (file_bytes if mode == "eager" else 0)
                room = _available_bytes() - args.margin_gib * 2**30
                if expected * 1.1 > room:
                    print(f"skip {family} {dtype_name} {mode}: expects ~{expected / 2**30:.1f} GiB, "
                          f"{room / 2**30:.1f} GiB available", flush=True)
                    continue
                figures[mode] = measure(family, path, mode, dtype_name)
                print(f"{family} {dtype_name} {mode}: peak RSS {figures[mode][0]:.2f} GiB, "
                      f"load CPU {figures[mode][1]:.1f} s", flush=True)
            rows.append((family, os.path.basename(path), file_bytes, dtype_name, models_bytes, figures))
    print()
    print("| family | file (fp16) | weights | models | eager peak RSS | streamed peak RSS | streamed / eager | "
          "load CPU s eager / streamed |")
    print("|---|---|---|---|---|---|---|---|")
    for family, name, file_bytes, dtype_name, models_bytes, figures in rows:
        eager, streamed = figures.get("eager"), figures.get("streamed")
        ratio = f"{streamed[0] / eager[0]:.3f}x" if eager and streamed else "-"
        seconds = f"{eager[1]:.0f} / {streamed[1]:.0f}" if eager and streamed else "-"
        print(f"| {family} | {name} {file_bytes / 2**30:.2f} GiB | {dtype_name} | {models_bytes / 2**30:.2f} GiB | "
              f"{_gib(eager)} | {_gib(streamed)} | {ratio} | {seconds} |")


if __name__ == "__main__":
    main()

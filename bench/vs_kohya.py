"""Side by side with kohya sd-scripts (KS) on the same workload: per-step CPU and wall seconds, set-up time, peak RSS.

    # once: a KS work tree and its own venv (KS pins older diffusers/transformers than we do)
    git --git-dir=<KS git dir> archive HEAD | tar -x -C /tmp/sd-scripts
    python3 -m venv /tmp/ksvenv && /tmp/ksvenv/bin/pip install torch==2.13.0 -r /tmp/sd-scripts/requirements.txt
    # (drop the last line of KS's requirements.txt, `-e .`, or run pip from inside the work tree)

    .venv/bin/python bench/vs_kohya.py --kohya /tmp/sd-scripts --kohya_python /tmp/ksvenv/bin/python \
        [--pairs 3] [--threads 1 all] [--steps 7] [--warmup 2] [--workdir /tmp/vs_kohya]

The workload (the same for both trainers): the full-size SD1.5 architecture with random weights, saved once as an
original-layout fp16 single file; 8 pictures of 256 px with captions; batch 1; fp32 (`--mixed_precision no`);
LoRA dim 16 / alpha 16 on the UNet and the text encoder; AdamW, lr 1e-4; cached latents; no data-loader workers.
KS reads its CLIP tokenizer from `--tokenizer_cache_dir` (filled here from our shipped tokenizer files). KS imports
torchvision for two transforms (ToTensor, Normalize); the PyPI torchvision wheels need CUDA torch, so where
`import torchvision` fails in KS's venv the script puts a stand-in with those two transforms on KS's PYTHONPATH
(same arithmetic; nothing else of torchvision is used on this path).

Runs alternate (KS, ours, KS, ours, ...) so that load on a shared machine hits both alike. For each run the script
reads the progress bar as it is printed and samples the process's CPU seconds (/proc/PID/stat) at every step;
the first `--warmup` steps are dropped. Set-up is the wall time from launch to the bar's first update (model
load, latent caching, network creation), and the CPU seconds spent until then (robust to load with one thread). Peak RSS is the kernel's high-water mark of the process (wait4).
With `--threads 1` (OMP_NUM_THREADS=1) CPU seconds per step measure the work even when other jobs share the
machine; with all cores, wall time is what a user sees. Ratios are ours / KS: below 1 is better for us.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PROGRESS = re.compile(r"steps:.*?(\d+)/(\d+) \[")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------------------------------------------
SCRIPTS = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py"}
# KS reads its tokenizers from --tokenizer_cache_dir/<hub name with / -> _>; filled from our shipped files
_TOKENIZER_CACHE = {"sd1": {"openai_clip-vit-large-patch14": "sd15/tokenizer"},
                    "sdxl": {"openai_clip-vit-large-patch14": "sdxl/tokenizer",
                             "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k": "sdxl/tokenizer_2"}}


def build_workload(workdir: str, family: str = "sd1") -> dict:
    """Random full-size SD1.5 (or SDXL) as an fp16 single file, 8 captioned pictures, KS's tokenizer cache. Built
    once. The SDXL file is bench/load_memory.py's (SAI layout, written in a child process if missing)."""
    os.makedirs(workdir, exist_ok=True)
    paths = {"model": os.path.join(workdir, "sd15_random.safetensors"), "data": os.path.join(workdir, "data"),
             "tokenizer_cache": os.path.join(workdir, "tokenizer_cache_" + family)}
    if family == "sdxl":
        from bench.load_memory import model_file

        paths["model"] = model_file("sdxl", workdir)
    elif not os.path.isfile(paths["model"]):
        _write_random_sd15(paths["model"])
    if not os.path.isdir(paths["data"]):
        _write_pictures(os.path.join(paths["data"], "1_sks photo"), count=8, size=256)
    for name, shipped in _TOKENIZER_CACHE[family].items():
        target = os.path.join(paths["tokenizer_cache"], name)
        if not os.path.isdir(target):  # the CLIP BPE files are shipped once, in sd15/tokenizer; then the config
            shutil.copytree(os.path.join(ROOT, "configs", "models", "sd15", "tokenizer"), target)
            shutil.copytree(os.path.join(ROOT, "configs", "models", shipped), target, dirs_exist_ok=True)
    return paths


def _write_random_sd15(path: str) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from library import ldm_convert

    config_dir = os.path.join(ROOT, "configs", "models", "sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(config_dir, "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(config_dir, "vae")))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(config_dir, "text_encoder")))
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in ldm_convert.unet_to_ldm(unet.state_dict(), unet.config).items()})
    state.update({"first_stage_model." + k: v for k, v in ldm_convert.vae_to_ldm(vae.state_dict(), vae.config).items()})
    state.update(ldm_convert.clip_to_ldm(text_encoder.state_dict()))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    save_file(state, path)


def _write_pictures(folder: str, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        low = rng.random((8, 8, 3))
        image = Image.fromarray((low * 255).astype("uint8")).resize((size, size), Image.BICUBIC)
        image.save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w") as f:
            f.write(f"sks photo, picture {i}")


_TORCHVISION_STAND_IN = {
    "torchvision/__init__.py": "from . import transforms  # noqa: F401\n",
    "torchvision/transforms/__init__.py": (
        "import numpy as np\nimport torch\nfrom . import functional  # noqa: F401\n\n\n"
        "class Compose:\n    def __init__(self, transforms):\n        self.transforms = transforms\n\n"
        "    def __call__(self, x):\n        for t in self.transforms:\n            x = t(x)\n        return x\n\n\n"
        "class ToTensor:\n    def __call__(self, picture):\n        array = np.asarray(picture)\n"
        "        if array.ndim == 2:\n            array = array[:, :, None]\n"
        "        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div(255)\n\n\n"
        "class Normalize:\n    def __init__(self, mean, std):\n"
        "        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]\n\n"
        "    def __call__(self, x):\n        return (x - self.mean) / self.std\n"),
    "torchvision/transforms/functional.py": (
        "def gaussian_blur(*args, **kwargs):\n    raise NotImplementedError('bench stand-in')\n\n\n"
        "def pil_to_tensor(*args, **kwargs):\n    raise NotImplementedError('bench stand-in')\n"),
}


def kohya_pythonpath(kohya_python: str, workdir: str) -> str | None:
    """A folder to put on KS's PYTHONPATH when its venv cannot import torchvision (see the module docstring)."""
    if subprocess.run([kohya_python, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return None
    folder = os.path.join(workdir, "torchvision_stand_in")
    for name, text in _TORCHVISION_STAND_IN.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    print(f"note: torchvision does not import in {kohya_python}; KS runs with the stand-in in {folder}")
    return folder


def common_flags(paths: dict, out: str, steps: int, mixed_precision: str = "no") -> list[str]:
    """The flags both trainers get (KS names)."""
    return ["--pretrained_model_name_or_path", paths["model"], "--train_data_dir", paths["data"],
            "--output_dir", out, "--output_name", "bench", "--resolution", "256", "--train_batch_size", "1",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--max_train_steps", str(steps), "--mixed_precision", mixed_precision, "--save_precision", "float",
            "--save_model_as", "safetensors", "--caption_extension", ".txt", "--cache_latents",
            "--max_data_loader_n_workers", "0", "--seed", "42", "--sdpa"]


# ----------------------------------------------------------------------------------------------------------------
# One measured run
# ----------------------------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def measure(command: list[str], cwd: str, threads: int | None, log_path: str, pythonpath: str | None = None) -> dict:
    """Run one trainer; per-step wall and CPU seconds from its progress bar, set-up seconds, peak RSS in GiB."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    else:
        env.pop("OMP_NUM_THREADS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks: list[tuple[int, float, float | None]] = []  # (step, wall, cpu) at each bar update
    buffer = b""
    with open(log_path, "wb") as log:
        while True:
            chunk = process.stdout.read1(4096) if hasattr(process.stdout, "read1") else process.stdout.read(1)
            if not chunk:
                break
            log.write(chunk)
            buffer += chunk
            *segments, buffer = re.split(rb"[\r\n]", buffer)
            # tqdm writes "\r<bar>" and ends the line only at the next update: the text after the last \r is the
            # bar as it stands now (reading only finished segments dated every update one step late)
            for segment in [*segments, buffer]:
                found = _PROGRESS.search(segment.decode("utf-8", "replace"))
                if found:
                    step = int(found.group(1))
                    if not marks or marks[-1][0] != step:
                        marks.append((step, time.perf_counter(), _cpu_seconds(process.pid)))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[1]} exited with {process.returncode}; see {log_path}")
    if len(marks) < 2:
        raise RuntimeError(f"no progress bar read from {command[1]}; see {log_path}")
    return {"marks": marks, "started": started, "peak_rss_gib": usage.ru_maxrss / 2**20}


def per_step(result: dict, warmup: int) -> dict:
    marks = [m for m in result["marks"] if m[0] >= warmup]
    steps = marks[-1][0] - marks[0][0]
    wall = (marks[-1][1] - marks[0][1]) / steps
    cpu = (marks[-1][2] - marks[0][2]) / steps if marks[0][2] is not None and marks[-1][2] is not None else float("nan")
    setup = result["marks"][0][1] - result["started"]
    setup_cpu = result["marks"][0][2] if result["marks"][0][2] is not None else float("nan")
    return {"wall": wall, "cpu": cpu, "setup": setup, "setup_cpu": setup_cpu, "rss": result["peak_rss_gib"]}


# ----------------------------------------------------------------------------------------------------------------
# Pairs and the table
# ----------------------------------------------------------------------------------------------------------------
def run_pairs(args: argparse.Namespace, paths: dict, threads: int | None) -> list[dict]:
    label = (f"{args.family}_" if args.family != "sd1" else "") + (f"{threads}thread" if threads else "allcores") \
        + ("" if args.mixed_precision == "no" else "_" + args.mixed_precision)
    pairs = []
    for pair in range(args.pairs):
        row = {}
        for name in ("kohya", "ours"):
            out = os.path.join(args.workdir, f"out_{name}_{label}_{pair}")
            shutil.rmtree(out, ignore_errors=True)
            flags = common_flags(paths, out, args.steps, args.mixed_precision)
            if name == "kohya":
                command = [args.kohya_python, os.path.join(args.kohya, SCRIPTS[args.family]), *flags,
                           "--tokenizer_cache_dir", paths["tokenizer_cache"]]
                cwd, pythonpath = args.kohya, args.kohya_pythonpath
            else:
                command = [sys.executable, os.path.join(ROOT, SCRIPTS[args.family]), *flags, *args.our_flags]
                cwd, pythonpath = ROOT, None
            log = os.path.join(args.workdir, f"log_{name}_{label}_{pair}.txt")
            row[name] = per_step(measure(command, cwd, threads, log, pythonpath), args.warmup)
            print(f"  {label} pair {pair + 1} {name:6s}: {row[name]['cpu']:.2f} cpu-s/step, {row[name]['wall']:.2f} "
                  f"s/step, set-up {row[name]['setup']:.1f} s ({row[name]['setup_cpu']:.1f} CPU s), "
                  f"peak RSS {row[name]['rss']:.2f} GiB", flush=True)
        pairs.append(row)
    return pairs


def ratio_line(pairs: list[dict], key: str) -> str:
    ratios = [p["ours"][key] / p["kohya"][key] for p in pairs]
    ours = statistics.median(p["ours"][key] for p in pairs)
    kohya = statistics.median(p["kohya"][key] for p in pairs)
    return f"{ours:.3g} | {kohya:.3g} | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def print_table(results: dict[str, list[dict]]) -> None:
    print("\n| threads, precision | measure | ours (median) | KS (median) | ours / KS: median (min-max over pairs) |")
    print("|---|---|---:|---:|---:|")
    for label, pairs in results.items():
        for key, name in (("cpu", "CPU s / step"), ("wall", "wall s / step"), ("setup", "set-up s"),
                          ("setup_cpu", "set-up CPU s"), ("rss", "peak RSS GiB")):
            print(f"| {label} | {name} | {ratio_line(pairs, key)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kohya", required=True, help="a kohya sd-scripts work tree")
    parser.add_argument("--kohya_python", required=True, help="python of a venv with KS's requirements")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", nargs="+", default=["1", "all"], help="1, all, or any thread counts")
    parser.add_argument("--steps", type=int, default=7, help="steps per run (the first --warmup are not measured)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/vs_kohya")
    parser.add_argument("--family", default="sd1", choices=list(SCRIPTS),
                        help="sdxl: the same workload on a random full-size SDXL (sdxl_train_network.py in both)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"],
                        help="both trainers (bf16: autocast on the CPU; frozen weights in bf16 in both)")
    parser.add_argument("--our_flags", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for our trainer only (e.g. --return_freed_memory), last on the line")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.kohya, "train_network.py")):
        parser.error(f"--kohya: {args.kohya} has no train_network.py")
    os.makedirs(args.workdir, exist_ok=True)
    paths = build_workload(args.workdir, args.family)
    args.kohya_pythonpath = kohya_pythonpath(args.kohya_python, args.workdir)
    results = {}
    for threads in args.threads:
        precision = "fp32" if args.mixed_precision == "no" else args.mixed_precision
        label = ("all cores" if threads == "all" else f"{threads}") + f", {precision}" \
            + ("" if args.family == "sd1" else f", {args.family}")
        print(f"threads: {label}", flush=True)
        results[label] = run_pairs(args, paths, None if threads == "all" else int(threads))
    print_table(results)
    with open(os.path.join(args.workdir, f"results_{args.family}_{args.mixed_precision}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

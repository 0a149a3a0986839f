"""Helpers for end-to-end trainer tests: tiny models on disk, tiny datasets, running a trainer in-process."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def save_tiny_sd15(folder: str, v_prediction: bool = False, seed: int = 0) -> str:
    from library.tiny_models import build_sd15

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        pipe = build_sd15(seed=seed)
        if v_prediction:
            pipe.scheduler.register_to_config(prediction_type="v_prediction")
        pipe.save_pretrained(folder)
    return folder


def make_images(folder: str, n: int, size: tuple[int, int] = (64, 64), caption: str | None = "sks photo",
                seed: int = 0) -> list[str]:
    """n smooth random colour images (PNG) with .txt captions."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = size
        base = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        path = os.path.join(folder, f"img{i:02d}.png")
        img.save(path)
        if caption is not None:
            with open(os.path.join(folder, f"img{i:02d}.txt"), "w", encoding="utf-8") as f:
                f.write(caption)
        paths.append(path)
    return paths


def base_argv(model: str, data: str, out: str, steps: int = 4, **extra) -> list[str]:
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--output_name", "lora", "--resolution", "64", "--network_dim", "4", "--network_alpha", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "1", "--caption_extension", ".txt"]
    for key, value in extra.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}"] + (list(map(str, value)) if isinstance(value, (list, tuple)) else [str(value)])
    return argv


def run_inprocess(family: str, argv: list[str]) -> str:
    """Run a trainer in this process; returns the final LoRA path."""
    from library import train_util
    from library.families import get_adapter
    from library.training_loop import train

    args = train_util.parse_args(family, argv)
    return train(args, get_adapter(family))


def run_script(script: str, argv: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([PYTHON, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def lora_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)

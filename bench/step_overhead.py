"""Trainer step overhead: the full trainer step against the bare forward + backward + optimizer step of the same
denoiser + LoRA on the same batch (median of 20 steps each).

    .venv/bin/python bench/step_overhead.py [--families sd1 sdxl sd3] [--steps 20]

Realistic widths with one layer per block: SD1.5 block widths (320, 640, 1280, 1280) at 32x32 latents; SDXL
widths (320, 640, 1280) with 1/2 transformer layers; an SD3-shaped MMDiT (24 heads x 64 = 1536 wide, 4 blocks).
The trainer step includes everything the loop does per step (data, text encoding, timestep sampling, noise,
loss and weights, gradient all-reduce, clipping, optimizer, scheduler, progress bar); the bare step is only
`adapter.predict` + MSE + backward + optimizer.step on a precomputed batch. Target: overhead at most 5 %.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def build_model(family: str, folder: str) -> None:
    from library import tiny_models as tm

    if family == "sd1":
        pipe = tm.build_sd15(unet_kwargs=dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, sample_size=32))
    elif family == "sdxl":
        from diffusers import UNet2DConditionModel
        pipe = tm.build_sdxl()
        pipe.unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
    else:
        from diffusers import SD3Transformer2DModel
        pipe = tm.build_sd3(with_t5=False)
        pipe.transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=64, caption_projection_dim=1536, pooled_projection_dim=64,
            pos_embed_max_size=32)
    pipe.save_pretrained(folder)


def trainer_step_times(family: str, model: str, data: str, out: str, steps: int) -> tuple[list[float], object]:
    """Per-step wall times of the real loop, measured between progress-bar updates."""
    import tqdm as tqdm_module
    from library import train_util, training_loop
    from library.families import get_adapter

    stamps: list[float] = []
    original_update = tqdm_module.tqdm.update

    def timed_update(self, n=1):
        stamps.append(time.perf_counter())
        return original_update(self, n)

    tqdm_module.tqdm.update = timed_update
    captured = {}
    original_loop = training_loop._loop

    def capture(run, *a):
        captured["run"] = run
        return original_loop(run, *a)

    training_loop._loop = capture
    script = {"sd1": "sd1", "sdxl": "sdxl", "sd3": "sd3"}[family]
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "256", "--network_dim", "16", "--network_alpha", "8", "--max_train_steps", str(steps + 3),
            "--learning_rate", "1e-4", "--seed", "0", "--cache_latents", "--network_train_unet_only",
            "--caption_extension", ".txt", "--max_grad_norm", "1.0"]
    if family == "sd3":
        argv += ["--t5xxl_max_token_length", "77"]
    try:
        args = train_util.parse_args(script, argv)
        training_loop.train(args, get_adapter(family))
    finally:
        tqdm_module.tqdm.update = original_update
        training_loop._loop = original_loop
    return [b - a for a, b in zip(stamps, stamps[1:])][2:], captured["run"]


def bare_step_times(run, steps: int) -> list[float]:
    """Forward + backward + optimizer step of the same denoiser + LoRA on one fixed batch."""
    batch = run.group.load_batch(run.group.make_batches(1)[0], 1, 0)
    adapter, models = run.adapter, run.models
    latents = batch["latents"].float()
    with torch.no_grad():
        tokens = adapter.tokenize(models, batch["captions"])
        conditioning = adapter.encode_text(models, tokens)
    timesteps = torch.full((latents.shape[0],), 500) if adapter.kind == "ddpm" else torch.full((latents.shape[0],), 500.0)
    params = [p for p in run.network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        pred = adapter.predict(models, latents, timesteps, conditioning, batch)
        loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=["sd1", "sdxl", "sd3"])
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()
    from tests.train_helpers import make_images

    rows = []
    for family in opts.families:
        with tempfile.TemporaryDirectory() as tmp:
            model = os.path.join(tmp, "model")
            build_model(family, model)
            make_images(os.path.join(tmp, "data", "4_sks photo"), 1, size=(256, 256))
            trainer, run = trainer_step_times(family, model, os.path.join(tmp, "data"), os.path.join(tmp, "out"),
                                              opts.steps)
            bare = bare_step_times(run, opts.steps)
            t, b = statistics.median(trainer), statistics.median(bare)
            rows.append((family, b, t, 100 * (t - b) / b))
    print(f"\n{'family':8} {'bare step (s)':>14} {'trainer step (s)':>17} {'overhead':>9}   (median of {opts.steps})")
    for family, b, t, pct in rows:
        print(f"{family:8} {b:14.4f} {t:17.4f} {pct:8.1f}%")


if __name__ == "__main__":
    main()

"""Peak memory of one SDXL-shaped LoRA training step in each memory mode (CPU, resident set size).

    .venv/bin/python bench/memory.py [--latent 32] [--rank 16] [--modes fp8_base_full_bf16 full_bf16 fp32]
                                     [--layers_per_block 2] [--transformer_layers 1 2 10]

The UNet is the full-width SDXL config (configs/models/sdxl/unet: 2.57 B parameters) with random weights, built
layer by layer straight into its storage dtype (so building never holds a wider copy), with a networks.lora
LoRA on every attention/FF Linear (rank --rank). One step = forward on a [1, 4, L, L] latent with SDXL-shaped
conditioning (77 x 2048 text states, 1280 pooled, 6 time ids), MSE loss, backward, AdamW step (its state is
created in that step). Modes, as the trainer sets them up (library/memory_modes.py):

    fp32                 no mixed precision: base weights and LoRA in fp32
    full_bf16            --mixed_precision bf16 --full_bf16: base weights and LoRA (weights, grads, AdamW state) bf16
    fp8_base_full_bf16   --mixed_precision bf16 --full_bf16 --fp8_base: base Linear/Conv weights float8_e4m3fn

Each mode runs in its own subprocess, one after another (fp32 last: it is the largest); a mode that would not fit
in the memory available now is skipped and says so (reduce --transformer_layers / --layers_per_block to measure
a smaller, stated, depth). "peak step" is the process's high-water RSS from just before the step to its end
(/proc/self/status VmHWM after resetting it through /proc/self/clear_refs), "resident" the RSS before the step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

MODES = ("fp8_base_full_bf16", "full_bf16", "fp32")
GIB = 2 ** 30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs) after returning freed heap."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def unet_config(layers_per_block: int, transformer_layers: list[int]) -> dict:
    from diffusers import UNet2DConditionModel
    config = dict(UNet2DConditionModel.load_config(os.path.join(ROOT, "configs", "models", "sdxl", "unet")))
    config.update(layers_per_block=layers_per_block, transformer_layers_per_block=transformer_layers)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet(config: dict, mode: str):
    """The UNet on the meta device, then each layer materialised in its storage dtype with random weights."""
    from diffusers import UNet2DConditionModel
    from library import memory_modes

    storage = torch.float32 if mode == "fp32" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(storage)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(0)
    for module in unet.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        module.to_empty(device="cpu", recurse=False)
        for tensor in module.parameters(recurse=False):
            tensor.requires_grad_(False)
            with torch.no_grad():
                tensor.normal_(0.0, 0.02, generator=generator)
        if mode.startswith("fp8") and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            memory_modes.store_weights_fp8(module, torch.bfloat16)
    return unet.eval()


def child(args: argparse.Namespace) -> None:
    from library import memory_modes
    from networks import lora

    mode = args.child
    torch.manual_seed(0)
    unet = build_unet(unet_config(args.layers_per_block, args.transformer_layers), mode)
    base_bytes = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    fp8_layers = [m for m in unet.modules() if hasattr(m, "weight_scale")]
    network = lora.create_network(1.0, args.rank, args.rank, None, None, unet)
    network.apply_to(None, unet, False, True)
    options = memory_modes.MemoryOptions(full_dtype=None if mode == "fp32" else torch.bfloat16)
    memory_modes.cast_network(network, options)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    compute = torch.float32 if mode == "fp32" else torch.bfloat16
    latent = args.latent
    noisy = torch.randn(1, 4, latent, latent, dtype=compute)
    hidden = torch.randn(1, 77, 2048, dtype=compute)
    added = {"text_embeds": torch.randn(1, 1280, dtype=compute),
             "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=compute)}
    target = torch.randn(1, 4, latent, latent)
    resident = _status_kib("VmRSS") * 1024
    _reset_peak()
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
        pred = unet(noisy, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "mode": mode, "base_bytes": base_bytes, "base_params": sum(p.numel() for p in unet.parameters())
        + sum(m.weight.numel() for m in fp8_layers),
        "fp8_weight_bytes": sum(m.weight.numel() + m.weight_scale.numel() * 4 for m in fp8_layers),
        "fp8_weight_params": sum(m.weight.numel() for m in fp8_layers),
        "lora_params": sum(p.numel() for p in params), "lora_dtype": str(params[0].dtype),
        "grad_dtype": str(params[0].grad.dtype), "resident": resident, "peak": _status_kib("VmHWM") * 1024,
        "seconds": seconds, "loss": loss.item()}))


def estimate_bytes(base_params: int, mode: str) -> int:
    """Rough need of a mode: its base weights, plus 40 % for activations, LoRA, allocator slack."""
    per_param = {"fp32": 4, "full_bf16": 2, "fp8_base_full_bf16": 1}[mode]
    return int(base_params * per_param * 1.4) + 2 * GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8); 32 = 256 px")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers_per_block", type=int, default=2, help="SDXL: 2")
    parser.add_argument("--transformer_layers", type=int, nargs=3, default=[1, 2, 10], help="SDXL: 1 2 10")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        base_params = sum(p.numel() for p in UNet2DConditionModel(
            **unet_config(args.layers_per_block, args.transformer_layers)).parameters())
    print(f"SDXL UNet (layers_per_block {args.layers_per_block}, transformer layers {args.transformer_layers}): "
          f"{base_params / 1e9:.2f} B parameters; latent {args.latent}x{args.latent} ({args.latent * 8} px), "
          f"LoRA rank {args.rank}, batch 1, AdamW")
    results = {}
    for mode in sorted(args.modes, key=MODES.index):  # fp32 last
        need, available = estimate_bytes(base_params, mode), _available_bytes()
        if need > available:
            print(f"{mode}: skipped, needs ~{need / GIB:.1f} GiB and {available / GIB:.1f} GiB are available")
            continue
        argv = [sys.executable, os.path.abspath(__file__), "--child", mode, "--latent", str(args.latent),
                "--rank", str(args.rank), "--layers_per_block", str(args.layers_per_block),
                "--transformer_layers", *map(str, args.transformer_layers)]
        # Tensors of 1 MiB and more are mmapped, so freeing one returns it to the OS and RSS counts live tensors
        # (glibc would otherwise keep freed mid-size tensors in its heap, as the CUDA caching allocator does).
        env = dict(os.environ, HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="1048576")
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"{mode}: failed (exit {done.returncode})\n{done.stderr[-2000:]}")
            continue
        results[mode] = json.loads(lines[-1])
        r = results[mode]
        print(f"  {mode}: peak {r['peak'] / GIB:.2f} GiB in {r['seconds']:.0f} s", flush=True)

    reference = results.get("fp32")
    print()
    print("| mode | base weights GiB | LoRA weights / grads | resident before step GiB | peak during step GiB "
          "| peak / fp32 | step s |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        ratio = f"{r['peak'] / reference['peak']:.2f}" if reference else "n/a"
        print(f"| {mode} | {r['base_bytes'] / GIB:.2f} | {r['lora_params'] / 1e6:.1f} M {r['lora_dtype'][6:]} / "
              f"{r['grad_dtype'][6:]} | {r['resident'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {ratio} | "
              f"{r['seconds']:.0f} |")
    fp8 = results.get("fp8_base_full_bf16")
    if fp8:
        ratio = fp8["fp8_weight_bytes"] / (2 * fp8["fp8_weight_params"])
        print(f"\nfp8 Linear/Conv weights (with their fp32 per-channel scales) / the same weights in bf16: {ratio:.3f} "
              "(target <= 0.55)")
        if "full_bf16" in results:
            print(f"fp8 all base weights / bf16 all base weights: "
                  f"{fp8['base_bytes'] / results['full_bf16']['base_bytes']:.3f}")


if __name__ == "__main__":
    main()

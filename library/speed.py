"""Speed options for the denoiser step: torch.compile (KS --torch_compile / --dynamo_backend) and channels_last.

    add_arguments(group)                 the flags (KS names; --channels_last is ours: KS has none)
    check(torch_compile, backend)        UserError for backends that cannot run here, before models load
    check_mixed_precision(mixed_precision)   a note for bf16 on a GPU that only emulates it (use fp16 there)
    apply(models, channels_last, compile_backend)   after the network is applied: channels_last, then compile
    channels_last_by_default(device, weight_dtype)  channels_last without the flag: CPU with bf16 weights
    vae_layout(vae, device)              the VAE's convolutions in channels_last on the CPU (always; see there)

Compile: `module.compile()` (in place, state_dict keys unchanged) of the denoiser, after LoRA has routed the
patched layers' forward through the network modules, so the traced graph holds UNet + LoRA. KS passes the backend
to accelerate, which compiles every prepared module; here only the denoiser (the step's cost) is compiled, text
encoders and VAE stay eager. Backends: inductor (CPU: C++/OpenMP kernels; CUDA: Triton), aot_eager and eager
(debugging); KS's other choices (nvfuser, tensorrt, onnxrt, ipex, tvm, ...) are refused. The first steps pay the
compile time; sampling and validation shapes compile again once. Measured effect: docs/performance.md.
"""
from __future__ import annotations

import logging

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

KS_BACKENDS = ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
               "onnxrt", "tensort", "ipex", "tvm"]
SUPPORTED_BACKENDS = ("inductor", "aot_eager", "eager")


def add_arguments(group) -> None:
    group.add_argument("--torch_compile", action="store_true",
                       help="compile the denoiser (with its LoRA) with torch.compile (KS flag)")
    group.add_argument("--dynamo_backend", type=str, default="inductor", choices=KS_BACKENDS,
                       help="torch.compile backend (KS flag; inductor, aot_eager or eager here)")
    group.add_argument("--channels_last", action="store_true",
                       help="our flag (KS has none): the UNet's conv weights and activations in channels_last layout "
                            "(always on for bf16 weights on the CPU, where it is faster)")
    group.add_argument("--return_freed_memory", action="store_true",
                       help="our flag: on the CPU, give freed memory back to the system as glibc does by default "
                            "(slower: every step page-faults its activations in again); see library/host_memory.py")


def check(torch_compile: bool, backend: str) -> None:
    if torch_compile and backend not in SUPPORTED_BACKENDS:
        raise UserError(f"--dynamo_backend {backend}: not supported here; use one of "
                        f"{', '.join(SUPPORTED_BACKENDS)} (inductor is the one that speeds up)")


def bf16_note(mixed_precision: str | None, capability: tuple[int, int] | None, device_name: str = "GPU") -> str | None:
    """A note for --mixed_precision bf16 on a CUDA GPU below compute capability 8 (Volta, Turing: V100, T4, RTX 20xx).

    torch reports bf16 there only as emulated (torch.cuda.is_bf16_supported(including_emulation=True): native from
    major 8) and accelerate accepts it; those GPUs have fp16 Tensor Cores, not bf16 ones, and SDPA's
    memory-efficient kernel takes bf16 only from sm80 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp).
    `capability` None: no CUDA device."""
    if mixed_precision != "bf16" or capability is None or capability[0] >= 8:
        return None
    return (f"note: --mixed_precision bf16 on {device_name} (compute capability {capability[0]}.{capability[1]}): "
            "bf16 is only emulated below 8.0; --mixed_precision fp16 runs on this GPU's Tensor Cores")


def check_mixed_precision(mixed_precision: str | None) -> None:
    """Print bf16_note for the GPU accelerate will use (the current CUDA device), if any."""
    if not torch.cuda.is_available():
        return
    note = bf16_note(mixed_precision, torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    if note:
        print(note)


def channels_last_by_default(device: torch.device, weight_dtype: torch.dtype) -> bool:
    """The denoiser goes to channels_last without --channels_last on the CPU when its frozen weights are bf16.

    Measured with bench/vs_kohya.py, full-size SD1.5 at 256 px, one thread: the bf16 step takes 0.96x the CPU time
    in NHWC (2.12 vs 2.17-2.25 s; oneDNN's bf16 convolutions run natively in NHWC), at the cost of ~0.7 s of set-up
    (one copy of the conv weights) and 0.2 GiB more peak memory (7 %). At fp32 NHWC was 8 % slower per step
    (bench/speed_options.py), so fp32 stays NCHW. Not on CUDA (not measured here; --channels_last asks for it)."""
    return device.type == "cpu" and weight_dtype == torch.bfloat16


def apply(models, channels_last: bool = False, compile_backend: str | None = None) -> None:
    """channels_last: the denoiser's 4-D weights in NHWC; compile_backend: torch.compile the denoiser in place."""
    denoiser = models.denoiser
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if compile_backend:
        denoiser.compile(backend=compile_backend)
        logger.info("denoiser compiled with torch.compile(backend=%s); the first step includes the compile",
                    compile_backend)


def vae_layout(vae: torch.nn.Module | None, device: torch.device) -> None:
    """On the CPU, the VAE's 4-D weights in channels_last (NHWC), for latent caching and on-the-fly encoding.

    A convolution with channels_last weights runs in NHWC (torch picks the layout from input or weight), which
    oneDNN computes without converting every layer's input and output from NCHW: the SD VAE encoder at 256 px, one
    thread, takes 0.91x the CPU time in fp32 and 0.89x in bf16 (bench/vae_encode.py). Results differ from NCHW in
    rounding only (5e-6 relative on the latents; tests/test_speed.py checks 1e-5). Not on CUDA, where cuDNN's
    choice depends on the GPU and dtype and was not measured here. The latents it returns are NHWC: the loop makes
    them contiguous (training_loop._encode_latents) so the UNet is not switched to NHWC with them."""
    if vae is not None and device.type == "cpu":
        vae.to(memory_format=torch.channels_last)

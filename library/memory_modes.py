"""Low-memory training modes with kohya sd-scripts (KS) names: --full_bf16 / --full_fp16, --fp8_base /
--fp8_base_unet, --gradient_checkpointing (denoiser and trained text encoders), --cpu_offload_checkpointing.

KS facts (train_network.py, library/train_util.py, 2026 snapshot):
* --full_fp16 / --full_bf16 cast the network to the mixed-precision dtype (`network.to(weight_dtype)`), so the
  LoRA weights, their gradients and the optimizer state live in that dtype; KS asserts --mixed_precision fp16 /
  bf16 to match. For fp16, KS lets accelerate's GradScaler unscale fp16 gradients (patch_accelerator_for_fp16_training).
* --fp8_base stores the frozen U-Net/DiT and the text encoders in float8_e4m3fn (token/position embeddings stay
  in the mixed-precision dtype); --fp8_base_unet only the U-Net/DiT. Both need --mixed_precision fp16|bf16. KS
  relies on CUDA autocast to up-cast each op's fp8 arguments.
* --cpu_offload_checkpointing (train_network.py, so every *_train_network script) calls
  `unet.enable_gradient_checkpointing(cpu_offload=True)`: only KS's Flux/Chroma models accept it.

Where we differ, and why:
* fp8: each output channel of a Linear/Conv2d weight is scaled into fp8's range (amax -> 448) before the cast,
  with the scale kept in fp32 beside it. A plain cast (KS) flushes every |w| < 2^-10 to zero and keeps at most 2
  significant bits below 2^-7, where many diffusion-model weights live; with the scale every weight
  keeps fp8's 3-bit mantissa (relative error <= 2^-4). The up-cast happens per layer in the forward, in an
  autograd function that saves the fp8 tensor (not an up-cast copy) for the backward, so a step never holds more
  than one layer's up-cast weight. LayerNorm/GroupNorm, embeddings and biases stay in the mixed-precision dtype;
  so do modules a model declares `_keep_in_fp32_modules` (T5's `wo`, whose input transformers casts to the
  weight's dtype).
* --stochastic_rounding (ours; needs --full_bf16 or --full_fp16): the optimizer steps on fp32 copies of the
  weights and gradients (its state is fp32) and writes the new weights back to bf16/fp16 with stochastic rounding
  (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision", §3: round up with probability equal to
  the distance to the lower neighbour, so E[round(x)] = x). Without it an update smaller than half a bf16 step
  (2^-8 relative) is lost; with it, it is kept in expectation. An fp32 master copy is what the default mode
  already is (LoRA weights in fp32, frozen model in the mixed-precision dtype), so we offer rounding, which keeps
  the memory saving of --full_bf16.
* --cpu_offload_checkpointing works for every family here: the denoiser's checkpointed blocks keep their inputs
  on the CPU and copy them back for the recomputation (diffusers' gradient_checkpointing_func).
"""
from __future__ import annotations

import argparse
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library import rng
from library.errors import UserError

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0                      # largest finite float8_e4m3fn
STREAM_STOCHASTIC_ROUNDING = "stochastic_rounding"
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory flags that train_util's KS groups do not already hold (--full_fp16/--full_bf16 and
    --gradient_checkpointing live in the training group)."""
    g = parser.add_argument_group("memory")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the frozen U-Net/DiT and text encoders in float8_e4m3fn, up-cast per layer "
                        "(needs --mixed_precision bf16 or fp16)")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="as --fp8_base for the U-Net/DiT only; the text encoders stay in the mixed-precision dtype")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="with --gradient_checkpointing: keep the checkpointed blocks' inputs on the CPU")
    g.add_argument("--stochastic_rounding", action="store_true",
                   help="with --full_bf16/--full_fp16: the optimizer steps in fp32 and writes the weights back with "
                        "stochastic rounding, so updates below the dtype's step are kept in expectation")


# ----------------------------------------------------------------------------------------------------------------
# Validation (before any model loads)
# ----------------------------------------------------------------------------------------------------------------
def has_accelerator() -> bool:
    """A GPU (CUDA) or Apple MPS device that accelerate would pick."""
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def check_mixed_precision_device(mixed_precision: str | None, accelerator_available: bool) -> None:
    """--mixed_precision fp16 without a GPU: accelerate would silently train in fp32 (CPU autocast is bf16)."""
    if mixed_precision == "fp16" and not accelerator_available:
        raise UserError("--mixed_precision fp16: needs a GPU (no CPU fp16 autocast; accelerate would silently run "
                        "fp32); use --mixed_precision bf16 on this CPU")


@dataclass
class MemoryOptions:
    """Validated memory-mode values."""
    full_dtype: torch.dtype | None = None       # --full_bf16 / --full_fp16: the LoRA weights' dtype
    stochastic_rounding: bool = False
    fp8_denoiser: bool = False                  # --fp8_base or --fp8_base_unet
    fp8_text_encoders: bool = False             # --fp8_base without --fp8_base_unet
    compute_dtype: torch.dtype = torch.float32  # the mixed-precision dtype fp8 weights are up-cast to
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, accelerator_available: bool | None = None) -> "MemoryOptions":
        if accelerator_available is None:
            accelerator_available = has_accelerator()
        mixed = args.mixed_precision if args.mixed_precision in _DTYPES else None
        check_mixed_precision_device(args.mixed_precision, accelerator_available)
        full_fp16, full_bf16 = bool(args.full_fp16), bool(args.full_bf16)
        if full_fp16 and full_bf16:
            raise UserError("--full_fp16 and --full_bf16 exclude each other; keep the one that matches "
                            "--mixed_precision")
        full_dtype = None
        for flag, wanted in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
            if getattr(args, flag):
                if args.mixed_precision != wanted:
                    raise UserError(f"--{flag}: needs --mixed_precision {wanted} (the LoRA trains in the dtype the "
                                    f"model runs in; KS asserts the same); add --mixed_precision {wanted}")
                full_dtype = _DTYPES[wanted]
        stochastic = bool(getattr(args, "stochastic_rounding", False))
        if stochastic and full_dtype is None:
            raise UserError("--stochastic_rounding: rounds the --full_bf16/--full_fp16 weights after each optimizer "
                            "step; add --full_bf16 (or drop --stochastic_rounding: fp32 LoRA weights need no rounding)")
        fp8_base, fp8_unet = bool(getattr(args, "fp8_base", False)), bool(getattr(args, "fp8_base_unet", False))
        if fp8_base or fp8_unet:
            flag = "--fp8_base" if fp8_base else "--fp8_base_unet"
            if FP8 is None:
                raise UserError(f"{flag}: this PyTorch has no float8_e4m3fn (needs torch >= 2.1)")
            if mixed is None:
                raise UserError(f"{flag}: fp8 weights are up-cast to the mixed-precision dtype; add "
                                "--mixed_precision bf16 (or fp16 on a GPU)")
        offload = bool(getattr(args, "cpu_offload_checkpointing", False))
        if offload and not args.gradient_checkpointing:
            raise UserError("--cpu_offload_checkpointing: offloads what --gradient_checkpointing keeps; add "
                            "--gradient_checkpointing")
        return cls(full_dtype=full_dtype, stochastic_rounding=stochastic, fp8_denoiser=fp8_base or fp8_unet,
                   fp8_text_encoders=fp8_base and not fp8_unet, compute_dtype=_DTYPES.get(mixed, torch.float32),
                   gradient_checkpointing=bool(args.gradient_checkpointing), cpu_offload_checkpointing=offload)


# ----------------------------------------------------------------------------------------------------------------
# fp8 base weights
# ----------------------------------------------------------------------------------------------------------------
def vae_dtype(weight_dtype: torch.dtype, no_half_vae: bool, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype, as KS: under --mixed_precision fp16/bf16 the VAE runs in that dtype (latent caching is then
    about twice as fast on bf16 hardware), unless --no_half_vae keeps it in fp32. One departure, a fix: a VAE whose
    config says force_upcast (the SDXL 1.0 VAE overflows in fp16) stays fp32 under fp16, where KS would cache NaN
    latents without --no_half_vae; bf16 has fp32's range, so it is used there as KS does."""
    if weight_dtype == torch.float32 or no_half_vae:
        return torch.float32
    if weight_dtype == torch.float16 and force_upcast:
        return torch.float32
    return weight_dtype


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [O, ...] -> (w8 float8_e4m3fn, scale fp32 [O, 1, ...]) with weight ≈ w8 · scale.

    scale = amax over each output channel / 448, so every channel uses fp8's full range (an all-zero channel
    gets scale 1). Relative error per weight <= 2^-4 for |w| >= amax · 2^-9 (fp8's normal range)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w8 · scale in `dtype` (the up-cast reference). One `dtype` tensor of the layer's size is the only
    temporary (fp8 values are exact in bf16/fp16; the product adds one rounding of that dtype)."""
    return w8.to(dtype).mul_(scale.to(dtype))


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8. Saves the fp8 tensor, not the up-cast copy, for the backward."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype):
        ctx.save_for_backward(w8, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), dequantize_fp8(w8, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad):
        _refuse_base_gradients(ctx)
        w8, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ dequantize_fp8(w8, scale, ctx.dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None, None


class _UpcastConv2d(torch.autograd.Function):
    """conv2d(x, W, b) with W stored in fp8 (zero padding, numeric padding only)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(w8, scale)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        b = None if bias is None else bias.to(dtype)
        return F.conv2d(x.to(dtype), dequantize_fp8(w8, scale, dtype), b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        _refuse_base_gradients(ctx)
        w8, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, dequantize_fp8(w8, scale, ctx.dtype),
                                                grad.to(ctx.dtype), *ctx.conv).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None, None


def _refuse_base_gradients(ctx) -> None:
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError("an fp8-stored base weight or bias requires a gradient; fp8 base weights are frozen")


def _fp8_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x, self.weight, self.weight_scale, self.bias, self.fp8_compute_dtype)


def _fp8_conv2d_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _UpcastConv2d.apply(x, self.weight, self.weight_scale, self.bias, self.fp8_compute_dtype, self.stride,
                               self.padding, self.dilation, self.groups)


def _convertible(layer: torch.nn.Module) -> bool:
    if isinstance(layer, torch.nn.Linear):
        return True
    return isinstance(layer, torch.nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def store_weights_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen Linear/Conv2d weight of `model` as float8_e4m3fn (per-channel scaled); each layer's
    forward up-casts it to `compute_dtype`. Returns the number of layers converted.

    Must run before a network patches the layers' forwards (a LoRA module then calls the fp8 forward as its
    org_forward). The fp8 tensor becomes a buffer named `weight` (with `weight_scale` beside it), so the model's
    parameters, and `model.dtype`, are its compute-dtype ones."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    count = 0
    for name, layer in model.named_modules():
        if not _convertible(layer) or keep.intersection(name.split(".")):
            continue
        if "forward" in vars(layer):
            raise RuntimeError(f"{name}: its forward is already patched; store fp8 weights before applying a network")
        weight = layer.weight
        if isinstance(weight, torch.nn.Parameter) and weight.requires_grad:
            raise RuntimeError(f"{name}: a trainable weight cannot be stored in fp8")
        w8, scale = quantize_fp8(weight)
        del layer._parameters["weight"]
        layer.register_buffer("weight", w8)
        layer.register_buffer("weight_scale", scale)
        layer.fp8_compute_dtype = compute_dtype
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(compute_dtype)
        forward = _fp8_linear_forward if isinstance(layer, torch.nn.Linear) else _fp8_conv2d_forward
        layer.forward = types.MethodType(forward, layer)
        count += 1
    return count


def base_weight(layer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A layer's weight in `dtype`, whether stored in fp8 (dequantized) or not (for DoRA norms, merging)."""
    if hasattr(layer, "weight_scale"):
        return dequantize_fp8(layer.weight, layer.weight_scale, dtype)
    return layer.weight.detach().to(dtype)


def apply_to_models(models, options: MemoryOptions) -> None:
    """After the models are placed and before a network is applied: fp8 storage of the frozen weights."""
    if options.fp8_denoiser:
        count = store_weights_fp8(models.denoiser, options.compute_dtype)
        print(f"fp8 base weights: {count} denoiser layers in float8_e4m3fn, up-cast to {options.compute_dtype}")
    if options.fp8_text_encoders:
        count = sum(store_weights_fp8(te, options.compute_dtype) for te in models.text_encoders if te is not None)
        print(f"fp8 base weights: {count} text-encoder layers in float8_e4m3fn")


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------
def offloading_checkpoint(function, *args):
    """torch.utils.checkpoint with the block's tensor inputs held on the CPU between forward and backward (the
    inputs are what checkpointing keeps); copied back to their device to run the block. KS Flux's
    create_cpu_offloading_wrapper does the same."""
    devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
    held = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args]

    def run(*host_args):
        return function(*[a.to(d) if d is not None else a for a, d in zip(host_args, devices)])

    return torch.utils.checkpoint.checkpoint(run, *held, use_reentrant=False)


def _offloading_gradient_checkpointing_func(module, *args):
    return offloading_checkpoint(module.__call__, *args)


def enable_gradient_checkpointing(models, network, options: MemoryOptions, train_text_encoder: bool) -> None:
    """--gradient_checkpointing for the denoiser (with --cpu_offload_checkpointing its block inputs live on the
    CPU) and, when their LoRA trains, the text encoders (KS: only trained encoders are checkpointed)."""
    if not options.gradient_checkpointing:
        return
    denoiser = models.denoiser
    if options.cpu_offload_checkpointing:
        import inspect
        if "gradient_checkpointing_func" not in inspect.signature(denoiser.enable_gradient_checkpointing).parameters:
            raise UserError("--cpu_offload_checkpointing: this diffusers version cannot take a checkpointing "
                            "function; upgrade diffusers or drop the flag")
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=_offloading_gradient_checkpointing_func)
    else:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()  # diffusers and transformers checkpoint only in training mode
    if train_text_encoder:
        for te in models.text_encoders:
            if te is None or not getattr(te, "supports_gradient_checkpointing", False):
                continue
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()  # non-reentrant, and makes the embedding output require grad so LoRA grads flow
            te.train()
    if hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------------------------
# --full_bf16 / --full_fp16 and --stochastic_rounding
# ----------------------------------------------------------------------------------------------------------------
def cast_network(network: torch.nn.Module, options: MemoryOptions) -> None:
    """--full_bf16/--full_fp16: the network's weights (and so its gradients) in that dtype (KS network.to)."""
    if options.full_dtype is not None:
        network.to(options.full_dtype)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (fp32) -> `dtype`, rounding to one of the two neighbours that bracket x, the upper one with probability
    (x − lo)/(hi − lo), so E[result] = x (Gupta et al. 2015 §3). Exact values are returned unchanged."""
    nearest = x.to(dtype)
    near = nearest.float()
    toward_x = torch.where(x > near, torch.tensor(float("inf"), device=x.device),
                           torch.tensor(float("-inf"), device=x.device)).to(dtype)
    other = torch.nextafter(nearest, toward_x)
    p_other = ((x - near) / (other.float() - near)).nan_to_num_(0.0)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < p_other, other, nearest)


class StochasticRounding:
    """Optimizer hooks for --stochastic_rounding: before each step the low-precision parameters and gradients
    become fp32 (so the optimizer's math and state are fp32); after it the parameters are rounded back
    stochastically, with draws keyed on (seed, step) (the same on every rank, so ranks stay identical, and on
    resume). The step counter travels in the optimizer's state_dict; loading casts the state with fp32
    parameters, so the fp32 state survives a resume."""

    STATE_KEY = "stochastic_rounding_steps"

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int):
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise UserError(f"--stochastic_rounding: {type(optimizer).__name__} has no step hooks (not a "
                            "torch.optim.Optimizer); drop --stochastic_rounding")
        self.seed, self.steps = seed, 0
        self.low: list[tuple[torch.nn.Parameter, torch.dtype]] = []
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._to_fp32(opt, with_grads=True))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._round_back())
        optimizer.register_state_dict_post_hook(self._save_steps)
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(lambda opt: self._restore_exact())

    def _to_fp32(self, optimizer, with_grads: bool) -> None:
        self.low = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype in (torch.bfloat16, torch.float16):
                    self.low.append((p, p.dtype))
                    p.data = p.data.float()
                    if with_grads and p.grad is not None:
                        p.grad = p.grad.float()

    def _round_back(self) -> None:
        if self.low:
            generator = rng.generator_for(self.seed, self.steps, 0, STREAM_STOCHASTIC_ROUNDING,
                                          self.low[0][0].device)
            for p, dtype in self.low:
                p.data = stochastic_round(p.data, dtype, generator)
                if p.grad is not None:
                    p.grad = p.grad.to(dtype)
        self.low = []
        self.steps += 1

    def _restore_exact(self) -> None:
        for p, dtype in self.low:
            p.data = p.data.to(dtype)  # values came from `dtype`: exact
        self.low = []

    def _save_steps(self, optimizer, state_dict: dict) -> dict:
        state_dict[self.STATE_KEY] = self.steps
        return state_dict

    def _before_load(self, optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop(self.STATE_KEY, 0))
        self._to_fp32(optimizer, with_grads=False)
        return state_dict


def wrap_optimizer_factory(factory, options: MemoryOptions, seed: int):
    """The optimizer factory, with --stochastic_rounding hooks on every optimizer it makes (each instance of a
    timestep-clustered optimizer too)."""
    if not options.stochastic_rounding:
        return factory

    def make(param_groups):
        optimizer = factory(param_groups)
        StochasticRounding(optimizer, seed)
        return optimizer

    return make


def prepare_accelerator(accelerator, options: MemoryOptions) -> None:
    """--full_fp16: let accelerate's GradScaler unscale fp16 gradients (it refuses them by default; KS
    patch_accelerator_for_fp16_training)."""
    scaler = getattr(accelerator, "scaler", None)
    if options.full_dtype is not torch.float16 or scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16

"""LoRA network for SD1/SD2, SDXL and SD3, with the kohya sd-scripts (KS) networks/lora.py API.

A LoRAModule wraps an org nn.Linear / nn.Conv2d by replacing its forward (KS style):

    y = org(x) + up(down(x)) · multiplier · scale,   scale = alpha / rank

(Hu et al. 2021, "LoRA", eq. 3; KS networks/lora.py LoRAModule). Init as KS / Microsoft: down kaiming_uniform
(a=√5), up zeros, so a new network changes nothing. Training-only regularisers (KS): `--network_dropout` drops
elements of down(x); `rank_dropout` drops whole rank channels per sample and rescales by 1/(1-p); `module_dropout`
skips the module for the whole batch with probability p.

Targets and file key names: networks/lora_keys.py; file layout: docs/lora-format.md.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.fileio import atomic_write
from library.memory_modes import base_weight
from library.errors import UserError
from library.families import get_family
from networks.hashing import precalculate_safetensors_hashes
from networks.lora_blocks import block_layout
from networks.network_api import KSNetworkAPI
from networks.lora_options import validate_network_args  # noqa: F401  (KS-style module API)
from networks.lora_keys import (LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_TEXT_ENCODER1, LORA_PREFIX_TEXT_ENCODER2,
                                LoraTarget, detect_family, text_encoder_list, text_encoder_targets, unet_targets)

logger = logging.getLogger(__name__)


# =========================================================================================================
# The module
# =========================================================================================================
def down_up_layers(org: torch.nn.Module, out_features: int, dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The rank-`dim` down and up layers of a LoRA on `org`: Linears, or for a conv a down conv with org's kernel,
    stride, padding and dilation and a 1×1 up conv (KS LoCon)."""
    if isinstance(org, torch.nn.Conv2d):
        return (torch.nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, org.dilation,
                                bias=False),
                torch.nn.Conv2d(dim, out_features, (1, 1), (1, 1), bias=False))
    return torch.nn.Linear(org.in_features, dim, bias=False), torch.nn.Linear(dim, out_features, bias=False)


def register_alpha(module: torch.nn.Module, alpha: float | torch.Tensor | None) -> None:
    """The `alpha` buffer (saved in files) and `scale = alpha / rank` of a LoRA module with `lora_dim` set.
    KS: alpha None or 0 means "no scaling" (alpha = rank, scale 1)."""
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float())
    alpha = float(module.lora_dim if alpha is None or alpha == 0 else alpha)
    module.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
    module.scale = alpha / module.lora_dim


def rank_keep_mask(lx: torch.Tensor, rank: int, p: float, channels_first: bool) -> torch.Tensor:
    """KS rank_dropout: a Bernoulli(1-p) keep-mask over (sample, rank channel) of lx = down(x), shaped to broadcast
    over tokens / pixels: [B, r, 1, 1] for a conv's lx (channels first), else [B, 1, ..., r]."""
    keep = (torch.rand((lx.size(0), rank), device=lx.device) > p).to(lx.dtype)
    if channels_first:
        return keep.view(lx.size(0), rank, *([1] * (lx.dim() - 2)))
    return keep.view(lx.size(0), *([1] * (lx.dim() - 2)), rank)


class LoRAModule(torch.nn.Module):
    """Low-rank update of one Linear / Conv2d. For a conv, down has the org kernel, stride and padding and up is
    1×1 (KS LoCon), so up∘down is the conv with weight up·down."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        out_features = org_module.out_channels if isinstance(org_module, torch.nn.Conv2d) else org_module.out_features
        self.lora_down, self.lora_up = down_up_layers(org_module, out_features, self.lora_dim)
        register_alpha(self, alpha)

        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # a list, not an attribute: the org module must not become a submodule (its weights would be saved)
        self.org_module_ref = [org_module]
        self.org_forward: Callable | None = None
        # filled by LoRANetwork: where the org module lives (diffusers / transformers naming)
        self.module_path = ""
        self.component = ""
        self.peft_name = ""

    @property
    def org_module(self) -> torch.nn.Module:
        return self.org_module_ref[0]

    @property
    def is_applied(self) -> bool:
        return self.org_forward is not None

    def apply_to(self) -> None:
        """Route the org module's forward through this module (KS: org_module.forward = self.forward)."""
        if self.is_applied:
            return
        self._forward_was_patched = "forward" in vars(self.org_module)  # someone else's patch, to put back
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo apply_to: the org module computes its own output again."""
        if not self.is_applied:
            return
        if self._forward_was_patched:
            self.org_module.forward = self.org_forward
        else:  # drop our instance attribute so the class's forward shows through again
            del self.org_module.forward
        self.org_forward = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Unlike KS (which keeps the scale computed at construction), a loaded alpha takes effect, so the
        # module computes exactly what the file it came from means.
        self.scale = float(self.alpha) / self.lora_dim

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_forwarded = self.org_forward(x, *args, **kwargs)

        if self.module_dropout is not None and self.training and torch.rand(1).item() < self.module_dropout:
            return org_forwarded

        lx = self.lora_down(x)
        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)

        scale = self.scale
        if self.rank_dropout is not None and self.training:
            lx = lx * self._rank_mask(lx)
            # as if the rank were (1-p)·r: keep the expected update size (KS)
            scale = scale / (1.0 - self.rank_dropout)

        return org_forwarded + self.lora_up(lx) * (self.multiplier * scale)

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        return rank_keep_mask(lx, self.lora_dim, self.rank_dropout, isinstance(self.lora_down, torch.nn.Conv2d))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · up·down in the org weight's shape (fp32; conv: Σ_r up[o,r]·down[r,i,kh,kw])."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if down.dim() == 4:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = up @ down
        return delta * self.scale


# =========================================================================================================
# DoRA
# =========================================================================================================
def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖_c of DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 2): the norm of each input column of W over the
    output (and kernel) axes, shaped to broadcast against W: [1, in] (Linear) or [1, in, 1, 1] (Conv2d).
    The same axis as A1111/Forge and ComfyUI's `weight_decompose` for a `.dora_scale` of this shape."""
    per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_input.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class DoRAModule(LoRAModule):
    """Weight-decomposed LoRA (DoRA, arXiv 2402.09353 eq. 5):

        W' = m · (W + ΔW) / ‖W + ΔW‖_c,   ΔW = scale · up·down,   m initialised to ‖W‖_c

    and the module adds multiplier · (W' − W) x, so multiplier 1 gives W' and a strength s gives W + s(W' − W)
    (ComfyUI's strength). ‖W + ΔW‖_c is detached from the graph (paper §4.3: it cuts the backward memory and the
    result is unchanged at inference). `m` is saved as `<lora_name>.dora_scale`, shape [1, in] / [1, in, 1, 1]."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, *args, **kwargs):
        super().__init__(lora_name, org_module, *args, **kwargs)
        self.dora_scale = torch.nn.Parameter(column_norm(base_weight(org_module)))

    def decomposed_delta(self) -> torch.Tensor:
        """W' − W in fp32 (W dequantized when --fp8_base stores it in fp8)."""
        weight = base_weight(self.org_module)
        merged = weight + self.delta_weight()
        return merged * (self.dora_scale / column_norm(merged).detach()) - weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_forwarded = self.org_forward(x, *args, **kwargs)
        if self.module_dropout is not None and self.training and torch.rand(1).item() < self.module_dropout:
            return org_forwarded
        delta = (self.decomposed_delta() * self.multiplier).to(x.dtype)
        org = self.org_module
        if isinstance(org, torch.nn.Conv2d):
            extra = torch.nn.functional.conv2d(x, delta, None, org.stride, org.padding, org.dilation, org.groups)
        else:
            extra = torch.nn.functional.linear(x, delta)
        return org_forwarded + extra


# =========================================================================================================
# --network_args
# =========================================================================================================
# =========================================================================================================
# File keys <-> module names
# =========================================================================================================
# file suffix -> (parameter name inside LoRAModule, is a PEFT suffix)
_KEY_SUFFIXES = {
    ".lora_down.weight": ("lora_down.weight", False),
    ".lora_up.weight": ("lora_up.weight", False),
    ".alpha": ("alpha", False),
    ".dora_scale": ("dora_scale", False),
    ".lora_A.weight": ("lora_down.weight", True),
    ".lora_B.weight": ("lora_up.weight", True),
}


def names_index(targets: Iterable[LoraTarget]) -> dict[str, LoraTarget]:
    """Every name a module may have in a file (KS name, SDXL diffusers-style alias, PEFT name) -> target."""
    index: dict[str, LoraTarget] = {}
    for target in targets:
        for name in (target.lora_name, *target.aliases, target.peft_name):
            index[name] = target
    return index


def to_internal_state_dict(file_sd: dict[str, torch.Tensor], index: dict[str, LoraTarget],
                           alpha_of: Callable[[str, int], float]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """File tensors -> {'<lora_name>.lora_down.weight' | '.lora_up.weight' | '.alpha': tensor}, unknown keys.

    PEFT files (lora_A / lora_B, no alpha) mean ΔW = B·A. The receiving module has alpha = alpha_of(lora_name,
    rank) and computes (alpha/rank)·up·down, so up = B · rank/alpha and the alpha entry is filled in."""
    internal: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in file_sd.items():
        for suffix, (param, is_peft) in _KEY_SUFFIXES.items():
            if key.endswith(suffix):
                target = index.get(key[: -len(suffix)])
                break
        else:
            target = None
        if target is None:
            unknown.append(key)
            continue
        name = f"{target.lora_name}.{param}"
        if name in internal:
            raise UserError(f"--network_weights: the file names module {target.lora_name} twice ('{source_of[name]}'"
                            f" and '{key}'); a LoRA file must use one naming style")
        if is_peft:
            rank = int(value.shape[0] if param == "lora_down.weight" else value.shape[1])
            alpha = float(alpha_of(target.lora_name, rank))
            internal[f"{target.lora_name}.alpha"] = torch.tensor(alpha)
            if param == "lora_up.weight":
                value = value.float() * (rank / alpha)
        internal[name] = value
        source_of[name] = key
    return internal, unknown


def read_lora_file(file: str, flag: str = "--network_weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, or of a torch pickle (weights_only)."""
    if not os.path.isfile(file):
        raise UserError(f"{flag}: file not found: {file}")
    if os.path.splitext(file)[1].lower() == ".safetensors":
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(file), metadata
    return torch.load(file, map_location="cpu", weights_only=True), {}




# =========================================================================================================
# The network
# =========================================================================================================
class LoRANetwork(KSNetworkAPI, torch.nn.Module):
    """All LoRA modules of one model. Submodules are named by their KS names, so state_dict() keys are
    '<lora_name>.lora_down.weight', '.lora_up.weight', '.alpha' for every family."""

    LORA_PREFIX_UNET = "lora_unet"
    saves_atomically = True  # save_weights writes a temp file and renames it
    LORA_PREFIX_TEXT_ENCODER = LORA_PREFIX_TEXT_ENCODER
    LORA_PREFIX_TEXT_ENCODER1 = LORA_PREFIX_TEXT_ENCODER1
    LORA_PREFIX_TEXT_ENCODER2 = LORA_PREFIX_TEXT_ENCODER2

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, block_dims: list[int] | None = None,
                 block_alphas: list[float] | None = None, conv_block_dims: list[int] | None = None,
                 conv_block_alphas: list[float] | None = None, modules_dim: dict[str, int] | None = None,
                 modules_alpha: dict[str, float] | None = None, module_class: type = LoRAModule,
                 loraplus_lr_ratio: float | None = None, loraplus_unet_lr_ratio: float | None = None,
                 loraplus_text_encoder_lr_ratio: float | None = None, varbose: bool = False,
                 exclude_patterns: list | None = None, include_patterns: list | None = None,
                 train_block_indices: list[int] | None = None, dora_wd: bool = False):
        """KS's constructor patterns: (lora_dim, alpha[, conv_lora_dim, conv_alpha]), block-wise (block_dims,
        block_alphas[, conv_block_dims, conv_block_alphas]) or from a file (modules_dim, modules_alpha).
        exclude_patterns / include_patterns (regexes, fullmatch on the module path or the KS name): a module
        matching an exclude pattern and no include pattern gets no LoRA (KS lora_anima). dora_wd: DoRAModule."""
        super().__init__()
        self.family = detect_family(unet)
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        self.block_lr_weight: list[float] | None = None
        self.dora_wd = dora_wd
        if dora_wd and module_class is LoRAModule:
            module_class = DoRAModule
        # the family's file format: "peft" (diffusers keys, SD3: what diffusers and ComfyUI load) or "kohya"
        self.file_format = get_family(self.family).lora_file_format

        # KS: LoCon blocks join the targets when conv dims are given or dims come from a file.
        include_conv = conv_lora_dim is not None or conv_block_dims is not None or modules_dim is not None
        targets = (text_encoder_targets(self.family, text_encoder_list(text_encoder))
                   + unet_targets(self.family, unet, include_conv))
        block_index = self._block_index_fn() if block_dims is not None else None
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        skipped = []
        for target in targets:
            linear_like = target.kind in ("linear", "conv1x1")  # KS: 1×1 convs (SD1 proj_in/out) use linear ranks
            if modules_dim is not None:
                dim = modules_dim.get(target.lora_name)
                module_alpha = (modules_alpha or {}).get(target.lora_name, dim)
            elif block_index is not None and not target.is_text_encoder:
                index = block_index(target.lora_name)
                if linear_like:
                    dim, module_alpha = block_dims[index], block_alphas[index]
                elif conv_block_dims is not None:
                    dim, module_alpha = conv_block_dims[index], conv_block_alphas[index]
                else:
                    dim = module_alpha = None
            elif linear_like:
                dim, module_alpha = lora_dim, alpha
            else:
                dim, module_alpha = conv_lora_dim, conv_alpha
            if dim and _excluded(target, exclude_patterns, include_patterns):
                dim = None
            if dim and train_block_indices is not None and not _in_selected_block(target, train_block_indices):
                dim = None
            if not dim:
                skipped.append(target.lora_name)
                continue
            lora = module_class(target.lora_name, target.module, multiplier, dim, module_alpha, dropout=dropout,
                                rank_dropout=rank_dropout, module_dropout=module_dropout)
            lora.module_path, lora.component, lora.peft_name = target.module_path, target.component, target.peft_name
            (self.text_encoder_loras if target.is_text_encoder else self.unet_loras).append(lora)
            self.add_module(lora.lora_name, lora)
        self._index = names_index(targets)
        if varbose and skipped:
            logger.info("LoRA: %d modules skipped (rank 0, excluded, or not in the weights file)", len(skipped))
        logger.info("LoRA (%s): %d text encoder modules, %d denoiser modules", self.family,
                    len(self.text_encoder_loras), len(self.unet_loras))

    def _block_index_fn(self):
        layout = block_layout(self.family)
        if layout is None:
            raise UserError(f"--network_args: block-wise options are for the SD1/SD2/SDXL UNet, not {self.family}")
        return layout.block_index

    def set_block_lr_weight(self, block_lr_weight: list[float] | None) -> None:
        """KS: per-block lr multipliers of the UNet modules (prepare_optimizer_params makes one group per block)."""
        self.block_lr_weight = block_lr_weight

    # ---- KS training API ----------------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
        """Optimizer param groups: one per text encoder, one for the denoiser (KS). text_encoder_lr is a number,
        None (-> default_lr) or a list (one per text encoder; a single value is used for all). With a LoRA+ ratio
        (Hayou et al. 2024) each part splits into a group without lora_up and a lora_up group at ratio · lr.
        With block lr weights (down/mid/up_lr_weight) the denoiser gets one group per KS block at lr · weight.
        A part whose lr is 0 is frozen (no group, requires_grad False)."""
        self.requires_grad_(True)
        te_lrs = _per_text_encoder(text_encoder_lr, default_lr)
        groups: list[dict] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for i, component in enumerate(("text_encoder", "text_encoder_2")):
            loras = [lora for lora in self.text_encoder_loras if lora.component == component]
            groups += _param_groups(loras, te_lrs[min(i, len(te_lrs) - 1)], te_ratio)
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        lr = unet_lr if unet_lr is not None else default_lr
        if self.block_lr_weight is None or not self.unet_loras:
            return groups + _param_groups(self.unet_loras, lr, unet_ratio)
        block_index = self._block_index_fn()
        by_block: dict[int, list[LoRAModule]] = {}
        for lora in self.unet_loras:
            by_block.setdefault(block_index(lora.lora_name), []).append(lora)
        for index, loras in by_block.items():
            groups += _param_groups(loras, None if lr is None else lr * self.block_lr_weight[index], unet_ratio)
        return groups

    # ---- --scale_weight_norms -----------------------------------------------------------------------------
    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """KS max-norm regularisation, after each optimizer step: for every module with ‖ΔW‖_F > max_norm
        (ΔW = scale · up·down), scale up and down by √(max_norm / ‖ΔW‖_F), so ‖ΔW‖_F becomes max_norm.
        Returns (keys_scaled, mean ‖ΔW‖ after scaling, max ‖ΔW‖ after scaling), as KS. One host sync."""
        loras = self.text_encoder_loras + self.unet_loras
        if not loras:
            return 0, 0.0, 0.0
        norms = torch.stack([lora.delta_weight().norm() for lora in loras])
        # KS: n = max(‖ΔW‖, max/2), ratio = min(n, max) / n: 1 unless ‖ΔW‖ > max
        floored = norms.clamp(min=max_norm_value / 2)
        ratios = floored.clamp(max=max_norm_value) / floored
        for lora, ratio in zip(loras, ratios.sqrt()):
            lora.lora_up.weight.mul_(ratio.to(lora.lora_up.weight.dtype))
            lora.lora_down.weight.mul_(ratio.to(lora.lora_down.weight.dtype))
        scaled_norms = norms * ratios
        keys_scaled, mean_norm, max_norm = torch.stack([(ratios != 1).sum().float(), scaled_norms.mean(),
                                                        scaled_norms.max()]).tolist()
        return int(keys_scaled), mean_norm, max_norm

    # ---- files ------------------------------------------------------------------------------------------
    def load_weights(self, file: str):
        """Load a LoRA file: our keys, SDXL diffusers-style names, PEFT keys (lora_A/lora_B). Returns
        torch's (missing_keys, unexpected_keys); keys naming no module of this model are unexpected."""
        weights_sd, _ = read_lora_file(file)
        return self.load_file_state_dict(weights_sd, source=file)

    def load_file_state_dict(self, weights_sd: dict[str, torch.Tensor], source: str = "state dict"):
        """load_weights for tensors already in memory."""
        internal, unknown = to_internal_state_dict(weights_sd, self._index, self._alpha_of)
        if weights_sd and not internal:
            raise UserError(f"--network_weights: none of the {len(weights_sd)} keys of {source} names a LoRA "
                            f"module of this {self.family} model (first key: '{next(iter(weights_sd))}'); "
                            "is the file for another model family?")
        return self.load_mapped_weights(internal, unknown, source,
                                        "use --dim_from_weights (or the file's --network_dim / conv_dim)")

    def _alpha_of(self, lora_name: str, rank: int) -> float:
        """A PEFT file keeps the network's own alpha (so resuming keeps the training parameterisation)."""
        module = getattr(self, lora_name, None)
        return float(module.alpha) if module is not None else float(rank)

    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors as written to a LoRA file, in `dtype`, on the CPU.

        kohya: '<lora_name>.lora_down.weight' / '.lora_up.weight' / '.alpha' (+ '.dora_scale' with DoRA).
        peft (SD3): '<peft_name>.lora_A.weight' = down, '.lora_B.weight' = scale · up (PEFT files carry no
        alpha and diffusers' SD3 loader rejects extra keys, so the scale is baked into B: every loader then
        computes the same W + B·A)."""
        tensors = {}
        for lora in self.text_encoder_loras + self.unet_loras:
            down = lora.lora_down.weight.detach()
            up = lora.lora_up.weight.detach()
            if self.file_format == "peft":
                tensors[f"{lora.peft_name}.lora_A.weight"] = down
                tensors[f"{lora.peft_name}.lora_B.weight"] = up.float() * lora.scale
            else:
                tensors[f"{lora.lora_name}.lora_down.weight"] = down
                tensors[f"{lora.lora_name}.lora_up.weight"] = up
                tensors[f"{lora.lora_name}.alpha"] = lora.alpha.detach()
                if isinstance(lora, DoRAModule):
                    tensors[f"{lora.lora_name}.dora_scale"] = lora.dora_scale.detach()
        return {k: v.to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in tensors.items()}

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Write the LoRA file atomically (temp file + os.replace). .safetensors get `metadata` (values as str)
        plus KS's sshs_model_hash / sshs_legacy_hash; other extensions are a torch pickle of the tensors."""
        tensors = self.file_state_dict(dtype)
        if os.path.splitext(file)[1].lower() == ".safetensors":
            metadata = {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
            model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
            metadata["sshs_model_hash"] = model_hash
            metadata["sshs_legacy_hash"] = legacy_hash
            atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata))
        else:
            atomic_write(file, lambda tmp: torch.save(tensors, tmp))

    # ---- merging ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd: dict | None = None, dtype=None,
                 device=None) -> None:
        """W ← W + multiplier · scale · up·down in the org modules, then unhook them (the network no longer
        adds anything). weights_sd (file keys, optional) is loaded first; text_encoder / unet are accepted for
        KS call compatibility (the modules already know their org modules)."""
        if weights_sd is not None:
            self.load_file_state_dict(weights_sd)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()
            weight = lora.org_module.weight
            delta = (lora.decomposed_delta() if isinstance(lora, DoRAModule) else lora.delta_weight()) \
                * lora.multiplier
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


def _per_text_encoder(text_encoder_lr, default_lr) -> list:
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
        return [default_lr]
    if isinstance(text_encoder_lr, (list, tuple)):
        return [float(lr) for lr in text_encoder_lr]
    return [float(text_encoder_lr)]


def _param_groups(loras: list[LoRAModule], lr, loraplus_ratio: float | None) -> list[dict]:
    """KS assemble_params: [{'params': all but lora_up (+lora_up)}, {'params': lora_up, 'lr': lr·ratio}] (LoRA+);
    lr 0 -> frozen, no group."""
    if not loras:
        return []
    named = [(name, p) for lora in loras for name, p in lora.named_parameters()]
    ups = [p for name, p in named if name.startswith("lora_up")]
    rest = [p for name, p in named if not name.startswith("lora_up")]
    if lr is not None and lr == 0:
        for _, p in named:
            p.requires_grad_(False)
        return []
    if loraplus_ratio is None:
        parts = [(rest + ups, lr)]
    else:
        parts = [(rest, lr), (ups, None if lr is None else lr * loraplus_ratio)]
    groups = []
    for params, group_lr in parts:
        group = {"params": params}
        if group_lr is not None:
            group["lr"] = group_lr
        groups.append(group)
    return groups


def _excluded(target: LoraTarget, exclude: list | None, include: list | None) -> bool:
    """KS lora_anima: excluded when an exclude pattern fullmatches and no include pattern does. A pattern may name
    the module path in the model (down_blocks.1.attentions.0...) or the KS file name (lora_unet_...)."""
    if not exclude:
        return False

    def matches(patterns):
        return any(p.fullmatch(target.module_path) or p.fullmatch(target.lora_name) for p in patterns or [])

    return matches(exclude) and not matches(include)


def _in_selected_block(target: LoraTarget, indices: list[int]) -> bool:
    """KS lora_sd3 train_block_indices: transformer (joint) block i keeps its modules when i is selected;
    modules outside the blocks and the text encoders are not filtered."""
    parts = target.module_path.split(".")
    if target.is_text_encoder or parts[0] != "transformer_blocks":
        return True
    return int(parts[1]) in indices


# =========================================================================================================
# KS entry points
# =========================================================================================================
def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """KS create_network. network_dim None -> 4 and network_alpha None -> 1.0 (KS defaults); kwargs are the
    --network_args strings (checked by validate_network_args: conv_dim, block_dims, loraplus_lr_ratio, ...).
    text_encoder: a module or a list (sdxl: [clip_l, clip_g]; sd3: [clip_l, clip_g, t5 or None])."""
    o = validate_network_args(kwargs, detect_family(unet), network_dim=network_dim, network_alpha=network_alpha,
                              network_dropout=neuron_dropout)
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=o.dim, alpha=o.alpha, dropout=o.dropout,
                          rank_dropout=o.rank_dropout, module_dropout=o.module_dropout, conv_lora_dim=o.conv_dim,
                          conv_alpha=o.conv_alpha, block_dims=o.block_dims, block_alphas=o.block_alphas,
                          conv_block_dims=o.conv_block_dims, conv_block_alphas=o.conv_block_alphas,
                          loraplus_lr_ratio=o.loraplus_lr_ratio, loraplus_unet_lr_ratio=o.loraplus_unet_lr_ratio,
                          loraplus_text_encoder_lr_ratio=o.loraplus_text_encoder_lr_ratio, varbose=True,
                          exclude_patterns=o.exclude_patterns, include_patterns=o.include_patterns,
                          train_block_indices=o.train_block_indices, dora_wd=o.dora_wd)
    network.set_block_lr_weight(o.block_lr_weight)
    return network


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: dict | None = None, for_inference: bool = False,
                                neuron_dropout: float | None = None, **kwargs) -> tuple[LoRANetwork, dict]:
    """KS create_network_from_weights (--dim_from_weights): one module per module in the file, with the file's
    rank and alpha (alpha = rank when the file has none, e.g. PEFT files), DoRA when the file has .dora_scale.
    Returns (network, weights) with the weights renamed to the network's state_dict keys, so
    network.load_state_dict(weights) loads them. for_inference is accepted for KS compatibility (the same module
    serves both). Of the network_args, dropouts, LoRA+ ratios and block lr weights apply (KS)."""
    if weights_sd is None:
        weights_sd, _ = read_lora_file(file)
    family = detect_family(unet)
    targets = text_encoder_targets(family, text_encoder_list(text_encoder)) + unet_targets(family, unet, True)
    # PEFT files carry no alpha: alpha = rank (scale 1), so B is used as is
    internal, unknown = to_internal_state_dict(weights_sd, names_index(targets), lambda name, rank: rank)
    if not internal:
        raise UserError(f"--network_weights: none of the {len(weights_sd)} keys of {file} names a LoRA module of "
                        f"this {family} model; is the file for another model family?")
    if unknown:
        logger.warning("LoRA weights: %d keys of %s match no module, e.g. %s", len(unknown), file, unknown[:3])
    modules_dim, modules_alpha = {}, {}
    for key, value in internal.items():
        name, param = key.split(".", 1)
        if param == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
        elif param == "alpha":
            modules_alpha[name] = float(value.float())
    for name, dim in modules_dim.items():
        modules_alpha.setdefault(name, dim)

    o = validate_network_args(kwargs, family, network_dropout=neuron_dropout)
    dora = any(key.endswith(".dora_scale") for key in internal)
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                          modules_alpha=modules_alpha, dropout=o.dropout, rank_dropout=o.rank_dropout,
                          module_dropout=o.module_dropout, loraplus_lr_ratio=o.loraplus_lr_ratio,
                          loraplus_unet_lr_ratio=o.loraplus_unet_lr_ratio,
                          loraplus_text_encoder_lr_ratio=o.loraplus_text_encoder_lr_ratio, dora_wd=dora)
    network.set_block_lr_weight(o.block_lr_weight)
    return network, internal

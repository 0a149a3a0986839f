"""One KS LoRA module over a fused base layer that our diffusers models hold as several modules (networks.lora_sd3,
networks.lora_flux).

KS trains on SAI's / BFL's models, where q, k, v (Flux's single blocks: q|k|v|mlp) are one Linear; diffusers splits
it into one module per part. A KS module holds D [r, in] and U [Σ out, r] of the fused layer, ΔW = scale·U·D with
scale = alpha/r, and the rows of W are the parts' outputs stacked, so part i adds

    y_i = org_i(x) + multiplier · scale · U[rows_i] · D x

to its module (rows_i: its rows of the fused layer, consecutive unless the layouts differ, e.g. SAI's (shift, scale)
adaLN halves). KS's `split_qkv` gives each part its own D_i [r, in] and U_i [d_i, r] (written to files as the
block-diagonal merge). Training regularisers as KS's LoRAModule: `dropout` on D x, `rank_dropout` (per-sample rank
channels, scaled by 1/(1-p)), `module_dropout` (skip the LoRA for the call), drawing rand(1), then the dropout mask,
then rand(B, r), on every part's call. Init as KS: D kaiming_uniform(a=√5), U zeros.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from networks.lora import down_up_layers, rank_keep_mask, register_alpha

Rows = slice | torch.Tensor | None   # a part's rows of the fused up weight: a range, an index tensor, or all


def out_features(module: torch.nn.Module) -> int:
    return module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features


class PartsLoRAModule(torch.nn.Module):
    """A LoRA on one KS-named fused layer made of ``len(org_modules)`` base Linears (or one Conv2d), outputs stacked.

    Parameters keep KS's names: ``lora_down`` / ``lora_up`` (split: ModuleLists ``lora_down.i`` / ``lora_up.i``) and
    the ``alpha`` buffer, so the state_dict is KS's file layout (split modules: see fused_weights)."""

    # Flux runs an fp32 LoRA on a half-precision model without autocast (CPU): the input goes to the LoRA's dtype
    # and its update back to the output's. SD3's module adds in the tensors' own dtypes (KS's lora_sd3 does).
    cast_to_lora_dtype = False

    def __init__(self, lora_name: str, org_modules: Sequence[torch.nn.Module], multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, split: bool = False,
                 rows: Sequence[Rows] | None = None):
        super().__init__()
        self.lora_name, self.lora_dim = lora_name, int(lora_dim)
        self.out_dims = [out_features(m) for m in org_modules]
        self.split = split and len(org_modules) > 1
        if self.split:   # KS split_qkv: each part its own rank-r down and up (all downs built first, as KS)
            in_dim = org_modules[0].in_features
            self.lora_down = torch.nn.ModuleList(torch.nn.Linear(in_dim, self.lora_dim, bias=False)
                                                 for _ in org_modules)
            self.lora_up = torch.nn.ModuleList(torch.nn.Linear(self.lora_dim, d, bias=False) for d in self.out_dims)
        else:
            self.lora_down, self.lora_up = down_up_layers(org_modules[0], sum(self.out_dims), self.lora_dim)
        register_alpha(self, alpha)
        for down in self._downs():
            torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for up in self._ups():
            torch.nn.init.zeros_(up.weight)
        if rows is None:
            starts = [sum(self.out_dims[:i]) for i in range(len(self.out_dims) + 1)]
            rows = [slice(a, b) for a, b in zip(starts, starts[1:])]
        self.rows: list[Rows] = list(rows)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.org_modules_ref = list(org_modules)   # a list: the org modules must not become submodules
        self.org_forwards: list[Callable] = []
        self.patched_before: list[bool] = []

    def _downs(self) -> list[torch.nn.Module]:
        return list(self.lora_down) if self.split else [self.lora_down]

    def _ups(self) -> list[torch.nn.Module]:
        return list(self.lora_up) if self.split else [self.lora_up]

    # ---- hooking the org modules ------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        return bool(self.org_forwards)

    def apply_to(self) -> None:
        """Route each org module's forward through its part of this LoRA."""
        if self.is_applied:
            return
        self.patched_before = [("forward" in vars(m)) for m in self.org_modules_ref]  # e.g. --fp8_base's forward
        for i, module in enumerate(self.org_modules_ref):
            self.org_forwards.append(module.forward)
            module.forward = self._part_forward(i)

    def restore(self) -> None:
        """Undo apply_to: each org module computes what it did before (its own or a previous patch's forward)."""
        for module, forward, was_patched in zip(self.org_modules_ref, self.org_forwards, self.patched_before):
            if was_patched:
                module.forward = forward
            elif "forward" in vars(module):
                del module.forward
        self.org_forwards = []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim   # a loaded alpha takes effect (as networks.lora)

    # ---- the forward of part i --------------------------------------------------------------------------
    def up_weight(self, i: int) -> torch.Tensor:
        """U_i: part i's own up weight (split) or its rows of the fused one."""
        if self.split:
            return self.lora_up[i].weight
        weight, rows = self.lora_up.weight, self.rows[i]
        if rows is None:
            return weight
        return weight[rows.to(weight.device) if isinstance(rows, torch.Tensor) else rows]

    def _part_forward(self, i: int) -> Callable:
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = self.org_forwards[i](x, *args, **kwargs)
            if self.module_dropout is not None and self.training and torch.rand(1).item() < self.module_dropout:
                return out
            down = self.lora_down[i] if self.split else self.lora_down
            lx = down(x.to(down.weight.dtype) if self.cast_to_lora_dtype else x)
            if self.dropout is not None and self.training:
                lx = torch.nn.functional.dropout(lx, p=self.dropout)
            scale = self.scale
            if self.rank_dropout is not None and self.training:
                lx = lx * rank_keep_mask(lx, self.lora_dim, self.rank_dropout, isinstance(down, torch.nn.Conv2d))
                scale = scale / (1.0 - self.rank_dropout)   # as if the rank were (1-p)·r (KS)
            up = self.up_weight(i)
            update = torch.nn.functional.conv2d(lx, up) if up.dim() == 4 else torch.nn.functional.linear(lx, up)
            update = update * (self.multiplier * scale)
            return out + (update.to(out.dtype) if self.cast_to_lora_dtype else update)
        forward.is_lora = True   # families/flux.py recognises a LoRA-patched layer by it
        return forward

    # ---- ΔW ---------------------------------------------------------------------------------------------
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as KS writes them: split parts merged block-diagonally (down [k·r, in], up [Σd, k·r])."""
        if not self.split:
            return self.lora_down.weight.detach(), self.lora_up.weight.detach()
        down = torch.cat([d.weight.detach() for d in self.lora_down], dim=0)
        up = torch.block_diag(*[u.weight.detach() for u in self.lora_up])
        return down, up

    def file_alpha(self) -> torch.Tensor:
        """The alpha written to the file. A merged split module has rank k·r there, and every reader (KS, ComfyUI,
        diffusers) scales by alpha/rank, so the file holds k·alpha to keep ΔW (KS writes alpha unchanged, which
        makes its split_qkv files k times weaker everywhere but in its own split modules)."""
        parts = len(self.out_dims) if self.split else 1
        return self.alpha.detach() * parts

    def delta_scale(self, rank: int) -> float:
        """The scale of ΔW = scale·U·D of the fused (rank `rank`) weights: the forward's alpha/r."""
        return self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW of the fused layer [Σ out, in] (conv: [Σ out, in, kh, kw] = Σ_r up[o,r]·down[r,i,kh,kw]), fp32."""
        down, up = self.fused_weights()
        up, down = up.float(), down.float()
        delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) if down.dim() == 4 else up @ down
        return delta * self.delta_scale(down.shape[0])

    @torch.no_grad()
    def merge_to_org(self) -> None:
        """Unhook, then W_i ← W_i + multiplier·ΔW[rows_i] in each org module."""
        self.restore()
        delta = self.delta_weight() * self.multiplier
        for module, rows in zip(self.org_modules_ref, self.rows):
            weight = module.weight
            part = delta if rows is None else delta[rows]
            weight.add_(part.to(weight.device, weight.dtype))

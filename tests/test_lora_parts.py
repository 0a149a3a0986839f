"""The multi-part LoRA module of networks.lora_sd3 and networks.lora_flux, pinned against an independent reference.

A KS module over a fused base layer (SAI / BFL qkv, Flux's linear1 = q|k|v|mlp, an adaLN with swapped halves) holds
D [r, in] and U [Σ out, r]; diffusers keeps the fused layer as separate modules, and part i adds

    multiplier · alpha/r · U[rows_i] · (D x)          (Hu et al. 2021, eq. 3; KS networks/lora_sd3.py, lora_flux.py)

to the output of its module (rows_i: its rows of the fused layer; swapped halves for SAI's (shift, scale) adaLN).
With KS's split_qkv (Flux) each part has its own D_i, U_i. In training, KS's regularisers draw their random numbers
in this order per call: module dropout rand(1) (skip the LoRA when < p), dropout on D x, rank dropout rand(B, r)
(a per-sample keep-mask over rank channels, the update scaled by 1/(1-p)). The reference below is written from
these formulas and the module's own state_dict tensors, and must agree bit for bit with the patched forwards.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from library import tiny_flux
from library.tiny_models import build_sd35
from networks import lora_flux, lora_sd3

MULTIPLIER = 0.75
ALPHA = 2.0          # exact in fp32: the reference's alpha/r equals the module's scale bit for bit
DROPOUTS = dict(rank_dropout="0.5", module_dropout="0.3")


def _randomise(network, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _swapped(n: int) -> torch.Tensor:
    return torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])


def _base_out(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x)   # the class's forward: what the base layer computes without a LoRA


def _reference(module, x, down, up, scale, *, training=False, dropout=None, rank_dropout=None, module_dropout=None):
    """base(x) + multiplier · scale · U (D x), with KS's regularisers in KS's order (see the module docstring)."""
    out = _base_out(module, x)
    if training and module_dropout is not None and torch.rand(1).item() < module_dropout:
        return out
    conv = down.dim() == 4
    lx = F.conv2d(x, down, stride=module.stride, padding=module.padding) if conv else F.linear(x, down)
    if training and dropout is not None:
        lx = F.dropout(lx, p=dropout)
    if training and rank_dropout is not None:
        keep = (torch.rand((lx.shape[0], down.shape[0])) > rank_dropout).to(lx.dtype)
        lx = lx * (keep[:, :, None, None] if conv else keep.view(lx.shape[0], *[1] * (lx.dim() - 2), -1))
        scale = scale / (1.0 - rank_dropout)
    return out + (F.conv2d(lx, up) if conv else F.linear(lx, up)) * (MULTIPLIER * scale)


def _input(module: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(2, module.in_channels, 8, 8, generator=generator)
    return torch.randn(2, 5, module.in_features, generator=generator)


def _check_parts(parts, training: bool, options: dict) -> int:
    """parts: (module, down, up rows, scale) per diffusers module. Returns how many calls module dropout skipped."""
    g = torch.Generator().manual_seed(1)
    skipped = 0
    for module, down, up, scale in parts:
        x = _input(module, g)
        for seed in range(6 if training else 1):
            torch.manual_seed(seed)
            ours = module(x)
            torch.manual_seed(seed)
            expected = _reference(module, x, down, up, scale, training=training, **options)
            assert torch.equal(ours, expected), (module, seed)
            skipped += torch.equal(ours, _base_out(module, x))
    return skipped


def _check_forwards(network, parts, options: dict) -> None:
    """Every patched part equals the reference in eval and, over seeds, in training (module dropout skipping some
    calls and not others); restore puts each class forward back."""
    regularisers = dict(dropout=options.get("neuron_dropout"),
                        rank_dropout=float(options["rank_dropout"]) if options else None,
                        module_dropout=float(options["module_dropout"]) if options else None)
    try:
        network.eval()
        _check_parts(parts, False, regularisers)
        network.train()
        skipped = _check_parts(parts, True, regularisers)
        assert (0 < skipped < 6 * len(parts)) if options else skipped == 0
    finally:
        network.restore()
    assert not any("forward" in vars(m) for m, *_ in parts)


# ----------------------------------------------------------------------------------------------
# SD3: fused qkv (three diffusers modules), swapped adaLN halves, the patch conv
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_pipe():
    return build_sd35("sd35_medium", seed=0, with_t5=False)


def _sd3_parts(network) -> list:
    """(module, D, U[rows], alpha/r) per diffusers module, rows from SAI's layout: q; k; v thirds for a qkv, swapped
    halves for the final layer's and the last (pre-only) context block's adaLN."""
    last = max(int(l.lora_name.split("_")[4]) for l in network.unet_loras if "_joint_blocks_" in l.lora_name)
    parts = []
    for lora in network.text_encoder_loras + network.unet_loras:
        sd = lora.state_dict()
        down, up = sd["lora_down.weight"], sd["lora_up.weight"]
        scale = float(sd["alpha"]) / down.shape[0]
        modules = [p.module for p in lora.target.parts]
        name = lora.lora_name
        if name.endswith("_qkv"):
            assert len(modules) == 3
            width = up.shape[0] // 3
            rows = [torch.arange(k * width, (k + 1) * width) for k in range(3)]
        elif name == "lora_unet_final_layer_adaLN_modulation_1" or \
                name == f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1":
            rows = [_swapped(up.shape[0])]
        else:
            rows = [torch.arange(up.shape[0])]
        parts += [(m, down, up[r], scale) for m, r in zip(modules, rows)]
    return parts


@pytest.mark.parametrize("options", [{}, dict(DROPOUTS, neuron_dropout=0.2)], ids=["plain", "dropouts"])
def test_sd3_parts_add_scaled_rows_of_one_fused_lora(sd3_pipe, options):
    pipe = sd3_pipe
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    network = lora_sd3.create_network(MULTIPLIER, 4, ALPHA, None, encoders, pipe.transformer,
                                      emb_dims="[4,4,4,4,4,4]", **options)
    _randomise(network)
    qkv = network.lora_unet_joint_blocks_0_x_block_attn_qkv
    assert list(qkv.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]   # resume files' names
    network.apply_to(encoders, pipe.transformer, True, True)
    parts = _sd3_parts(network)
    assert any(isinstance(m, torch.nn.Conv2d) for m, *_ in parts)
    _check_forwards(network, parts, options)

    # files: kohya = the state_dict; peft B = scale · U[rows] per diffusers module (A shared)
    network.set_file_format("kohya")
    kohya = network.file_state_dict()
    assert kohya.keys() == network.state_dict().keys()
    assert all(torch.equal(kohya[k], v) for k, v in network.state_dict().items())
    qkv_parts = [p for p in parts if any(p[0] is q.module for q in qkv.target.parts)]
    network.set_file_format("peft")
    peft = network.file_state_dict()
    for (module, down, up, scale), part in zip(qkv_parts, qkv.target.parts):
        key = f"transformer.{part.path}"
        assert torch.equal(peft[f"{key}.lora_A.weight"], down)
        assert torch.equal(peft[f"{key}.lora_B.weight"], up * scale)

    # merge: W_i + multiplier · (scale · U D)[rows_i]
    before = [(m, m.weight.detach().clone(), down, up, scale) for m, down, up, scale in parts]
    network.merge_to()
    for module, weight, down, up, scale in before:
        delta = (torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) if down.dim() == 4 else up @ down) * scale
        torch.testing.assert_close(module.weight.detach(), weight + MULTIPLIER * delta, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Flux: fused qkv, linear1 = q|k|v|mlp, split_qkv
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux.build("dev")


def _flux_parts(network, transformer) -> list:
    """(module, D_i, U_i, alpha/r) per diffusers module: consecutive row blocks of U in the KS module's part order
    (q, k, v(, mlp)); with split_qkv the part's own D_i, U_i."""
    parts = []
    for lora in network.unet_loras:
        sd = lora.state_dict()
        modules = [transformer.get_submodule(p) for p in lora.module_paths]
        if "lora_down.weight" in sd:
            down, up = sd["lora_down.weight"], sd["lora_up.weight"]
            starts = [0]
            for m in modules:
                starts.append(starts[-1] + m.out_features)
            assert starts[-1] == up.shape[0]
            pieces = [(down, up[a:b]) for a, b in zip(starts, starts[1:])]
        else:
            pieces = [(sd[f"lora_down.{i}.weight"], sd[f"lora_up.{i}.weight"]) for i in range(len(modules))]
        parts += [(m, d, u, float(sd["alpha"]) / d.shape[0]) for m, (d, u) in zip(modules, pieces)]
    return parts


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split_qkv"])
@pytest.mark.parametrize("options", [{}, dict(DROPOUTS, neuron_dropout=0.2)], ids=["plain", "dropouts"])
def test_flux_parts_add_scaled_rows_of_one_fused_lora(flux_pipe, split, options):
    pipe = flux_pipe
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    network = lora_flux.create_network(MULTIPLIER, 4, ALPHA, None, encoders, pipe.transformer, split_qkv=str(split),
                                       **options)
    _randomise(network)
    linear1 = network.lora_unet_single_blocks_0_linear1
    names = ["alpha"] + ([f"lora_{p}.{i}.weight" for p in ("down", "up") for i in range(4)] if split
                         else ["lora_down.weight", "lora_up.weight"])
    assert list(linear1.state_dict()) == names   # resume files' names
    network.apply_to(encoders, pipe.transformer, False, True)
    parts = _flux_parts(network, pipe.transformer)
    _check_forwards(network, parts, options)

    # the file: KS's fused tensors (split: down stacked, up block-diagonal, alpha k·alpha so alpha/rank is kept)
    file = network.file_state_dict()
    sd = linear1.state_dict()
    if split:
        assert torch.equal(file[f"{linear1.lora_name}.lora_down.weight"],
                           torch.cat([sd[f"lora_down.{i}.weight"] for i in range(4)]))
        assert torch.equal(file[f"{linear1.lora_name}.lora_up.weight"],
                           torch.block_diag(*[sd[f"lora_up.{i}.weight"] for i in range(4)]))
        assert float(file[f"{linear1.lora_name}.alpha"]) == 4 * ALPHA
    else:
        assert all(torch.equal(file[f"{linear1.lora_name}.{k}"], v) for k, v in sd.items())

    before = [(m, m.weight.detach().clone(), down, up, scale) for m, down, up, scale in parts]
    network.merge_to()
    for module, weight, down, up, scale in before:
        torch.testing.assert_close(module.weight.detach(), weight + MULTIPLIER * scale * (up @ down), rtol=0,
                                   atol=1e-6)

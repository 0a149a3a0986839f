"""KS sd3_train_network.py flags beyond loading (library/sd3_train_utils.py add_sd3_training_arguments, KS's
library/strategy_sd3.py for their meaning), with KS's names, types and defaults:

* --apply_lg_attn_mask / --apply_t5_attn_mask: CLIP-L/G resp. T5 are called with the padding attention mask of
  their tokens (1 up to and including the first end-of-text token). KS passes the masks to the encoders only; the
  MMDiT gets none ("TODO support attention mask" in KS), nor here.
* --clip_l_dropout_rate / --clip_g_dropout_rate / --t5_dropout_rate: per sample and training step, zero that
  encoder's part of the conditioning (CLIP-L: its hidden-state columns and its pooled half; CLIP-G: its columns and
  half; T5: its sequence rows), as KS's encode_tokens / drop_cached_text_encoder_outputs do, so cached outputs are
  dropped too. Applied in training steps only (gradients enabled), not in validation or sampling.
* --t5xxl_dtype: T5-XXL's weights in that dtype (KS marks it "[DOES NOT WORK] not supported yet"; here it works).
* --pos_emb_random_crop_rate: with that probability a training step takes the MMDiT's position embeddings from a
  random crop of its pos_embed_max_size² table instead of the centre (KS MMDiT.cropped_pos_embed; SD3.5 medium).
* --enable_scaled_pos_embed: refused (KS's per-resolution rescaled position tables are not built here).
* --blocks_to_swap: CPU-only runs have nothing to swap (a note); on CUDA refused until built.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from library.errors import UserError

T5_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DROPOUT_FLAGS = ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--apply_lg_attn_mask", action="store_true",
                       help="call CLIP-L and CLIP-G with the padding attention mask of their tokens (KS)")
    group.add_argument("--apply_t5_attn_mask", action="store_true",
                       help="call T5-XXL with the padding attention mask of its tokens (KS)")
    group.add_argument("--t5xxl_dtype", type=str, default=None,
                       help="T5-XXL weight dtype: float32 | fp16 | bf16 (default: the mixed-precision dtype)")
    group.add_argument("--clip_l_dropout_rate", type=float, default=0.0,
                       help="per-sample probability of zeroing CLIP-L's conditioning in a training step (KS)")
    group.add_argument("--clip_g_dropout_rate", type=float, default=0.0,
                       help="per-sample probability of zeroing CLIP-G's conditioning in a training step (KS)")
    group.add_argument("--t5_dropout_rate", type=float, default=0.0,
                       help="per-sample probability of zeroing T5's conditioning in a training step (KS)")
    group.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                       help="probability of a random (not centred) crop of the position-embedding table per "
                            "training step (KS; meant for SD3.5 medium)")
    group.add_argument("--enable_scaled_pos_embed", action="store_true",
                       help="KS SD3.5M per-resolution scaled position embeddings: not built here (refused)")
    group.add_argument("--blocks_to_swap", type=int, default=None,
                       help="KS block swap between CPU and GPU: on CPU-only runs nothing to swap (a note); on CUDA "
                            "refused until built")


def check(opts: Any) -> None:
    for flag in (*DROPOUT_FLAGS, "pos_emb_random_crop_rate"):
        value = getattr(opts, flag)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--{flag}: {value} must be a probability in [0, 1]")
    if opts.t5xxl_dtype is not None and opts.t5xxl_dtype.lower() not in T5_DTYPES:
        raise UserError(f"--t5xxl_dtype: '{opts.t5xxl_dtype}' is not one of float32, fp16, bf16")
    if opts.enable_scaled_pos_embed:
        raise UserError("--enable_scaled_pos_embed: not built here: KS's SAI MMDiT keeps one rescaled position table "
                        "per bucket resolution (SD3.5 medium); diffusers' SD3Transformer2DModel has one table, cropped. "
                        "Drop the flag (the centred crop is SD3's own behaviour)")
    if opts.blocks_to_swap is not None and opts.blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap: {opts.blocks_to_swap} must be >= 0")
    if opts.blocks_to_swap and torch.cuda.is_available():
        raise UserError("--blocks_to_swap: swapping MMDiT blocks between host and GPU is not built yet; drop it and "
                        "save memory with --gradient_checkpointing, --fp8_base or --cache_text_encoder_outputs")


def load_note(opts: Any) -> None:
    if opts.blocks_to_swap:
        print(f"note: --blocks_to_swap {opts.blocks_to_swap}: training on the CPU, every block is already in host "
              "memory: nothing to swap")


def t5_dtype(opts: Any) -> torch.dtype | None:
    return T5_DTYPES[opts.t5xxl_dtype.lower()] if opts.t5xxl_dtype else None


def extra(opts: Any, tokenizers: list) -> dict:
    """What encode_text / predict need at run time (Models.extra)."""
    return {"apply_lg_attn_mask": opts.apply_lg_attn_mask, "apply_t5_attn_mask": opts.apply_t5_attn_mask,
            "eos_token_ids": [tok.eos_token_id for tok in tokenizers],
            "dropout_rates": [getattr(opts, flag) for flag in DROPOUT_FLAGS]}


def mask_through_eos(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for every position up to and including the first end-of-text token (the tokenizer's attention mask of a
    max_length-padded sequence), 0 after it; all ones when the text was truncated before an eos."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return (positions <= first[:, None]).long()


def install_pos_emb_random_crop(transformer: torch.nn.Module, rate: float) -> None:
    """With probability `rate` per forward with gradients enabled (a training step), crop the position table at a
    random offset (KS MMDiT.cropped_pos_embed(random_crop=True)) instead of the centre."""
    if not rate:
        return
    patch_embed = transformer.pos_embed
    if getattr(patch_embed, "pos_embed_max_size", None) is None:
        raise UserError("--pos_emb_random_crop_rate: this MMDiT has no pos_embed_max_size table to crop from")
    centred = patch_embed.cropped_pos_embed

    def cropped_pos_embed(height, width):
        if not (torch.is_grad_enabled() and torch.rand(1).item() < rate):
            return centred(height, width)
        size, p = patch_embed.pos_embed_max_size, patch_embed.patch_size
        h, w = height // p, width // p
        top = torch.randint(0, size - h + 1, (1,)).item()
        left = torch.randint(0, size - w + 1, (1,)).item()
        table = patch_embed.pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
        return table.reshape(1, -1, table.shape[-1])

    patch_embed.cropped_pos_embed = cropped_pos_embed


def drop_conditioning(extra_: dict, hidden: torch.Tensor, pooled: torch.Tensor, clip_widths: tuple[int, int],
                      pooled_widths: tuple[int, int], clip_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KS per-sample encoder dropout in a training step: zero CLIP-L's / CLIP-G's columns of the first clip_len
    rows and their pooled halves, T5's rows after clip_len."""
    rates = extra_.get("dropout_rates") or [0.0, 0.0, 0.0]
    if not any(rates) or not torch.is_grad_enabled():
        return hidden, pooled
    batch = hidden.shape[0]
    drop = torch.rand(batch, 3) < torch.tensor(rates)
    if not drop.any():
        return hidden, pooled
    hidden, pooled = hidden.clone(), pooled.clone()
    wl, wg = clip_widths
    pl, _ = pooled_widths
    for i in range(batch):
        if drop[i, 0]:
            hidden[i, :clip_len, :wl] = 0
            pooled[i, :pl] = 0
        if drop[i, 1]:
            hidden[i, :clip_len, wl:wl + wg] = 0
            pooled[i, pl:] = 0
        if drop[i, 2]:
            hidden[i, clip_len:] = 0
    return hidden, pooled

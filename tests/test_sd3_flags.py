"""KS sd3_train_network.py flags (library/families/sd3_flags.py): names, types and defaults as KS; masks, dropout,
random position crop and T5 dtype do what KS does; what is not built is refused with the reason."""
from __future__ import annotations

import pytest
import torch

from library import train_util
from library.errors import UserError
from library.families import sd3_flags
from library.families.sd3 import SD3Options, check_options

KS_DEFAULTS = {"apply_lg_attn_mask": False, "apply_t5_attn_mask": False, "t5xxl_dtype": None,
               "clip_l_dropout_rate": 0.0, "clip_g_dropout_rate": 0.0, "t5_dropout_rate": 0.0,
               "pos_emb_random_crop_rate": 0.0, "enable_scaled_pos_embed": False, "blocks_to_swap": None,
               "training_shift": None, "weighting_scheme": "uniform", "lora_format": "peft"}


def _args(*flags):
    return train_util.parse_args("sd3", ["--pretrained_model_name_or_path", "x", "--output_dir", "o",
                                         "--train_data_dir", "d", *flags])


def test_ks_names_and_defaults():
    args = _args()
    for flag, default in KS_DEFAULTS.items():
        if flag == "training_shift":
            assert args.timestep_shift is None   # --training_shift is an alias of --timestep_shift (KS default 1.0)
            continue
        assert getattr(args, flag) == default, flag
    args = _args("--apply_t5_attn_mask", "--clip_l_dropout_rate", "0.1", "--t5xxl_dtype", "bf16",
                 "--blocks_to_swap", "32", "--training_shift", "3.0", "--pos_emb_random_crop_rate", "0.2")
    assert args.apply_t5_attn_mask and args.clip_l_dropout_rate == 0.1 and args.t5xxl_dtype == "bf16"
    assert args.blocks_to_swap == 32 and args.timestep_shift == 3.0 and args.pos_emb_random_crop_rate == 0.2


@pytest.mark.parametrize("field, value, message", [
    ("clip_g_dropout_rate", 1.5, "probability"),
    ("t5xxl_dtype", "int8", "t5xxl_dtype"),
    ("enable_scaled_pos_embed", True, "not built"),
    ("blocks_to_swap", -1, ">= 0"),
])
def test_refusals(field, value, message):
    opts = SD3Options(pretrained_model_name_or_path="x", **{field: value})
    with pytest.raises(UserError, match=message):
        check_options(opts)


def test_blocks_to_swap_on_cpu_is_a_note_and_on_cuda_refused(monkeypatch, capsys):
    opts = SD3Options(pretrained_model_name_or_path="x", blocks_to_swap=32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_options(opts)
    sd3_flags.load_note(opts)
    assert "nothing to swap" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="blocks_to_swap"):
        check_options(opts)


def test_mask_runs_through_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 9, 9, 9], [5, 6, 7, 8, 9]])
    assert sd3_flags.mask_through_eos(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_dropout_zeroes_each_encoders_part_in_training_steps_only():
    extra = {"dropout_rates": [1.0, 0.0, 0.0]}
    hidden, pooled = torch.ones(2, 5, 8), torch.ones(2, 6)
    h, p = sd3_flags.drop_conditioning(extra, hidden, pooled, (3, 2), (4, 2), clip_len=3)
    assert h[:, :3, :3].abs().sum() == 0 and h[:, :3, 3:].min() == 1 and h[:, 3:].min() == 1
    assert p[:, :4].abs().sum() == 0 and p[:, 4:].min() == 1
    extra = {"dropout_rates": [0.0, 1.0, 1.0]}
    h, p = sd3_flags.drop_conditioning(extra, hidden, pooled, (3, 2), (4, 2), clip_len=3)
    assert h[:, :3, 3:5].abs().sum() == 0 and h[:, 3:].abs().sum() == 0 and h[:, :3, :3].min() == 1
    assert p[:, 4:].abs().sum() == 0
    with torch.no_grad():   # validation / sampling: no dropout
        h, _ = sd3_flags.drop_conditioning(extra, hidden, pooled, (3, 2), (4, 2), clip_len=3)
    assert h.min() == 1


def test_pos_emb_random_crop_only_in_training_steps():
    from library.tiny_models import build_sd3

    transformer = build_sd3(seed=0, with_t5=False).transformer
    patch_embed = transformer.pos_embed
    centred = patch_embed.cropped_pos_embed(8, 8)
    sd3_flags.install_pos_emb_random_crop(transformer, 1.0)
    torch.manual_seed(0)
    crops = [patch_embed.cropped_pos_embed(8, 8) for _ in range(8)]
    assert any(not torch.equal(c, centred) for c in crops)
    assert all(c.shape == centred.shape for c in crops)
    with torch.no_grad():
        assert torch.equal(patch_embed.cropped_pos_embed(8, 8), centred)

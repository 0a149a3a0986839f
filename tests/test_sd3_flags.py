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


def test_shipped_sd35_configs_have_the_published_sizes():
    """configs/models/sd35_{medium,large}: transformer parameters + the position table (a buffer, stored in the
    files) = SD3.5 medium 2.47 B (its 4.94 GB fp16 file), SD3.5 large 8.15 B (published: "8.1 B")."""
    import os

    from diffusers import SD3Transformer2DModel

    from library.families.loading import REPO_CONFIG_ROOT

    sizes = {}
    for key in ("sd35_medium", "sd35_large"):
        with torch.device("meta"):
            config = SD3Transformer2DModel.load_config(os.path.join(REPO_CONFIG_ROOT, key), subfolder="transformer")
            mmdit = SD3Transformer2DModel.from_config(config)
        stored = sum(p.numel() for p in mmdit.parameters()) + mmdit.pos_embed.pos_embed.numel()
        sizes[key] = round(stored / 1e9, 2)
        assert mmdit.config.qk_norm == "rms_norm"
    assert sizes == {"sd35_medium": 2.47, "sd35_large": 8.15}


def test_sai_files_pick_their_shipped_config():
    """diffusers' infer_diffusers_model_type on the real sizes (meta tensors stand in for the weights)."""
    from library.families.sd3 import shipped_config_key

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    p = "model.diffusion_model."
    sd3 = {p + "joint_blocks.0.context_block.adaLN_modulation.1.bias": meta(9216), p + "pos_embed": meta(1, 36864, 1536)}
    medium = dict(sd3, **{p + "pos_embed": meta(1, 147456, 1536)})
    large = {p + "joint_blocks.0.context_block.adaLN_modulation.1.bias": meta(14592),
             p + "joint_blocks.37.x_block.mlp.fc1.weight": meta(9728, 2432)}
    assert [shipped_config_key(c) for c in (sd3, medium, large)] == ["sd3", "sd35_medium", "sd35_large"]


def test_modelspec_architecture_as_ks_names_it():
    from library.families.sd3 import modelspec_architecture
    from library.tiny_models import build_sd3, build_sd35

    assert modelspec_architecture(build_sd3(with_t5=False).transformer) == "stable-diffusion-3-medium/lora"
    assert modelspec_architecture(build_sd35("sd35_medium", with_t5=False).transformer) == \
        "stable-diffusion-3-5-medium/lora"
    assert modelspec_architecture(build_sd35("sd35_large", with_t5=False).transformer) == \
        "stable-diffusion-3-5-large/lora"


@pytest.mark.slow
def test_attention_masks_reach_the_encoders(tmp_path):
    """--apply_t5_attn_mask changes T5's outputs (bidirectional: padding no longer attended); --apply_lg_attn_mask
    leaves CLIP's real-token outputs as they were (causal attention never sees later padding) and the pooled ones."""
    from library.families.sd3 import ADAPTER
    from library.tiny_models import build_sd3

    folder = str(tmp_path / "tiny")
    build_sd3(seed=0).save_pretrained(folder)

    def encode(**flags):
        models = ADAPTER.load(SD3Options(folder, t5xxl_max_token_length=16, **flags))
        with torch.no_grad():
            return ADAPTER.encode_text(models, ADAPTER.tokenize(models, ["a red cat"])), models

    plain, models = encode()
    t5_masked, _ = encode(apply_t5_attn_mask=True)
    lg_masked, _ = encode(apply_lg_attn_mask=True)
    clip_len = models.extra["clip_length"]
    n_real = int(sd3_flags.mask_through_eos(ADAPTER.tokenize(models, ["a red cat"])[0], models.extra["eos_token_ids"][0]).sum())
    assert not torch.allclose(plain["encoder_hidden_states"][:, clip_len:], t5_masked["encoder_hidden_states"][:, clip_len:])
    torch.testing.assert_close(plain["encoder_hidden_states"][:, :n_real], lg_masked["encoder_hidden_states"][:, :n_real])
    torch.testing.assert_close(plain["pooled_projections"], lg_masked["pooled_projections"])

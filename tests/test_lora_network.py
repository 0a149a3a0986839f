"""networks/lora.py: module math, dropout modes, key names per family, save/load, metadata, hashes, atomic writes."""
from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save

import networks.lora as lora_mod
from library.errors import UserError
from library.tiny_models import build_sd15, build_sd3, build_sdxl
from networks.hashing import precalculate_safetensors_hashes
from networks.lora import LoRAModule, create_network, create_network_from_weights
from networks.lora_keys import detect_family, sdxl_sai_path


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def tiny(family: str):
    """(text_encoder argument as the trainer passes it, list of text encoders, denoiser) of a fresh tiny model."""
    if family == "sd1":
        p = build_sd15(seed=0)
        return p.text_encoder, [p.text_encoder], p.unet
    if family == "sdxl":
        p = build_sdxl(seed=0)
        return [p.text_encoder, p.text_encoder_2], [p.text_encoder, p.text_encoder_2], p.unet
    p = build_sd3(seed=0, with_t5=False)
    tes = [p.text_encoder, p.text_encoder_2, None]
    return tes, tes[:2], p.transformer


def randomise(network, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)
            lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=g) * std)


def te_output(te) -> torch.Tensor:
    ids = torch.arange(2, 12).unsqueeze(0)
    with torch.no_grad():
        return te(ids)[0]


def unet_output(unet, family) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if family == "sd3":
            x = torch.randn(1, 16, 8, 8, generator=g)
            return unet(x, encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                        pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0])).sample
        x = torch.randn(1, 4, 8, 8, generator=g)
        cond = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
        kwargs = {}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return unet(x, torch.tensor([500]), cond, **kwargs).sample


def file_keys(path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def file_metadata(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------------------------------------------------
# LoRAModule math
# ---------------------------------------------------------------------------------------------------------
def test_linear_module_adds_scaled_low_rank_update():
    """y = W x + b + multiplier · (alpha/rank) · U D x; alpha 2, rank 4 -> scale 0.5."""
    torch.manual_seed(0)
    org = torch.nn.Linear(6, 5)
    x = torch.randn(3, 7, 6)
    base = org(x).detach()
    lora = LoRAModule("lora_test", org, multiplier=0.8, lora_dim=4, alpha=2)
    lora.apply_to()
    torch.testing.assert_close(org(x), base)  # up starts at zero: a new LoRA changes nothing
    assert lora.lora_down.weight.abs().sum() > 0  # kaiming init of down
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    expected = base + 0.8 * 0.5 * (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    torch.testing.assert_close(org(x), expected.detach())
    lora.restore()
    assert "forward" not in vars(org)
    torch.testing.assert_close(org(x), base)


def test_conv_module_equals_conv_with_merged_weight():
    """LoCon: down = org kernel/stride/padding, up = 1×1, so the update is conv(x, Σ_r up[:,r] down[r])."""
    torch.manual_seed(0)
    org = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9)
    lora = LoRAModule("lora_conv", org, lora_dim=3, alpha=1.5)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    delta = torch.einsum("or,rikl->oikl", lora.lora_up.weight[:, :, 0, 0], lora.lora_down.weight) * (1.5 / 3)
    expected = F.conv2d(x, org.weight + delta, org.bias, stride=2, padding=1)
    torch.testing.assert_close(org(x), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.delta_weight(), delta.detach())


@pytest.mark.parametrize("alpha", [None, 0])
def test_alpha_none_or_zero_means_rank(alpha):
    lora = LoRAModule("lora_x", torch.nn.Linear(4, 4), lora_dim=8, alpha=alpha)
    assert lora.scale == 1.0 and float(lora.alpha) == 8.0


def test_dropouts_act_only_in_train_mode():
    torch.manual_seed(0)
    org = torch.nn.Linear(8, 8)
    x = torch.randn(4, 5, 8)
    lora = LoRAModule("lora_x", org, lora_dim=4, alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.eval()
    clean = org(x).detach()
    torch.testing.assert_close(org(x), clean)  # eval: deterministic, no dropout
    lora.train()
    outputs = [org(x).detach() for _ in range(8)]
    assert all((o - clean).abs().max() > 1e-3 for o in outputs)  # each draw differs from the eval output
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(outputs, outputs[1:]))


def test_rank_dropout_masks_rank_channels_per_sample_and_rescales():
    """out = org + U (D x ⊙ m) · scale / (1-p), m ~ Bernoulli(1-p) per (sample, rank), shared over tokens."""
    torch.manual_seed(0)
    org = torch.nn.Linear(6, 6)
    x = torch.randn(3, 5, 6)
    lora = LoRAModule("lora_x", org, lora_dim=4, alpha=2, rank_dropout=0.25)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    torch.manual_seed(7)
    out = org(x).detach()
    torch.manual_seed(7)
    keep = (torch.rand(3, 4) > 0.25).float()
    lx = (x @ lora.lora_down.weight.T) * keep[:, None, :]
    expected = org.weight @ x.unsqueeze(-1)
    expected = expected.squeeze(-1) + org.bias + (lx @ lora.lora_up.weight.T) * (0.5 / 0.75)
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


def test_module_dropout_skips_whole_module_with_probability_p():
    torch.manual_seed(0)
    org = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    base = org(x).detach()
    lora = LoRAModule("lora_x", org, lora_dim=2, alpha=2, module_dropout=0.5)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.eval()
    full = org(x).detach()
    lora.train()
    skipped = 0
    for _ in range(400):
        out = org(x)
        is_base = torch.equal(out, base)
        assert is_base or torch.allclose(out, full)
        skipped += is_base
    assert 0.4 < skipped / 400 < 0.6


# ---------------------------------------------------------------------------------------------------------
# Key names per family
# ---------------------------------------------------------------------------------------------------------
def saved_network(family, tmp_path, **network_args):
    te_arg, tes, unet = tiny(family)
    network = create_network(1.0, 4, 2, None, te_arg, unet, **network_args)
    network.apply_to(te_arg, unet)
    randomise(network)
    path = str(tmp_path / f"{family}.safetensors")
    network.save_weights(path, torch.float32, {"ss_network_dim": "4"})
    return network, path, tes, unet


def test_sd1_keys_are_kohya_diffusers_paths(tmp_path):
    network, path, _, _ = saved_network("sd1", tmp_path)
    keys = set(file_keys(path))
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",  # a 1×1 conv in SD1: linear rank
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    # 2 TE layers × 6 linears + 4 Transformer2DModels × (proj_in, proj_out, 8 attention, 2 ff) = 12 + 48
    assert len(keys) == 3 * 60
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert not any("resnets" in k for k in keys)  # no conv_dim: no LoCon modules
    assert load_file(path)["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4


def test_sd1_locon_adds_resnet_and_sampler_convs(tmp_path):
    network, path, _, _ = saved_network("sd1", tmp_path, conv_dim="2", conv_alpha="1")
    tensors = load_file(path)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0
    assert tensors["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape[0] == 2
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight" in tensors
    # KS: the Linear / 1×1 conv inside a resnet get the linear rank
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"]) == 2.0


def test_sdxl_keys_are_sai_layout_and_never_mixed(tmp_path):
    network, path, _, _ = saved_network("sdxl", tmp_path, conv_dim="2")
    keys = set(file_keys(path))
    # tiny SDXL: 2 blocks, layers_per_block 1 -> down block 1 = input_blocks 3, up block 0 = output_blocks 0, 1
    for name in ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q",
                 "lora_unet_input_blocks_3_1_proj_in",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                 "lora_unet_output_blocks_1_1_proj_out",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_input_blocks_2_0_op", "lora_unet_input_blocks_3_0_skip_connection",
                 "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_1_2_conv",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert f"{name}.lora_down.weight" in keys, name
    assert not any(s in k for k in keys for s in ("down_blocks", "mid_block", "up_blocks", "lora_te_"))


def test_sdxl_sai_mapping_of_real_sdxl_config_agrees_with_diffusers_inverse():
    """Real SDXL: 3 blocks × 2 layers. Our diffusers -> SAI names, mapped back by diffusers' own
    _maybe_map_sgm_blocks_to_diffusers, give the original block path."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    config = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.attentions.0.proj_in": "output_blocks.0.1.proj_in",
        "up_blocks.0.attentions.2.proj_in": "output_blocks.2.1.proj_in",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    }
    for path, sai in expected.items():
        assert sdxl_sai_path(path, config) == sai
    sd = {f"lora_unet_{sdxl_sai_path(p, config).replace('.', '_')}.lora_down.weight": p for p in expected}
    back = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=2))
    sgm_names = {"down_blocks": "input_blocks", "mid_block": "middle_block", "up_blocks": "output_blocks"}
    for path in expected:
        parts = path.split(".")
        block = parts[:3] if parts[0] == "mid_block" else parts[:4]  # e.g. down_blocks.1.attentions.0
        prefix = "lora_unet_" + "_".join([sgm_names[block[0]]] + block[1:]) + "_"
        assert [k for k, v in back.items() if v == path][0].startswith(prefix), path


def test_sd3_keys_are_peft_with_scale_baked_in(tmp_path):
    network, path, _, _ = saved_network("sd3", tmp_path)
    tensors = load_file(path)
    keys = set(tensors)
    for name in ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_out.0",
                 "transformer.transformer_blocks.0.attn.to_add_out", "transformer.transformer_blocks.1.attn.add_q_proj",
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                 "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"):
        assert {f"{name}.lora_A.weight", f"{name}.lora_B.weight"} <= keys, name
    # the last block is context_pre_only: no to_add_out there
    assert "transformer.transformer_blocks.1.attn.to_add_out.lora_A.weight" not in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # no alpha, no kohya names
    assert len(keys) == 2 * (len(network.text_encoder_loras) + len(network.unet_loras))
    q = network.unet_loras[0]
    assert q.peft_name == "transformer.transformer_blocks.0.attn.to_q"
    torch.testing.assert_close(tensors[f"{q.peft_name}.lora_B.weight"], q.lora_up.weight.detach() * 0.5)  # α/r = 2/4


def test_family_detection():
    assert detect_family(tiny("sd1")[2]) == "sd1"
    assert detect_family(tiny("sdxl")[2]) == "sdxl"
    assert detect_family(tiny("sd3")[2]) == "sd3"


# ---------------------------------------------------------------------------------------------------------
# network_args and flags
# ---------------------------------------------------------------------------------------------------------
def test_network_args_strings_become_numbers():
    te, _, unet = tiny("sd1")
    network = create_network(1.0, 8, None, None, te, unet, conv_dim="4", conv_alpha="2", rank_dropout="0.1",
                             module_dropout="0.2")
    convs = [m for m in network.unet_loras if isinstance(m.lora_down, torch.nn.Conv2d)
             and m.lora_down.kernel_size == (3, 3)]
    assert convs and all(m.lora_dim == 4 and m.scale == 0.5 for m in convs)
    linears = [m for m in network.unet_loras if isinstance(m.lora_down, torch.nn.Linear)]
    assert all(m.lora_dim == 8 and m.scale == 1 / 8 for m in linears)  # KS: network_alpha None -> 1
    assert all(m.rank_dropout == 0.1 and m.module_dropout == 0.2 for m in network.unet_loras)


def test_unknown_network_arg_names_key_and_closest():
    te, _, unet = tiny("sd1")
    with pytest.raises(UserError) as err:
        create_network(1.0, 4, 1, None, te, unet, conv_dimm="4")
    assert "conv_dimm" in str(err.value) and "did you mean 'conv_dim'" in str(err.value)
    assert str(err.value).startswith("--network_args")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(network_dim=0), "--network_dim"), (dict(network_dim="x"), "--network_dim"),
    (dict(network_alpha=-1), "--network_alpha"), (dict(neuron_dropout=1.0), "--network_dropout"),
    (dict(rank_dropout="1.5"), "rank_dropout"), (dict(conv_dim="two"), "conv_dim"),
])
def test_bad_values_are_user_errors_naming_the_flag(kwargs, flag):
    te, _, unet = tiny("sd1")
    args = dict(network_dim=4, network_alpha=1)
    args.update(kwargs)
    with pytest.raises(UserError, match=flag):
        create_network(1.0, args.pop("network_dim"), args.pop("network_alpha"), None, te, unet, **args)


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_save_then_load_weights_round_trip(family, tmp_path):
    network, path, tes, unet = saved_network(family, tmp_path)
    want_te, want_unet = te_output(tes[0]), unet_output(unet, family)
    network.restore()

    te_arg, tes2, unet2 = tiny(family)  # same base weights (seed 0), fresh LoRA init
    other = create_network(1.0, 4, 2, None, te_arg, unet2)
    other.apply_to(te_arg, unet2)
    info = other.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    for key, value in network.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(te_output(tes2[0]), want_te, atol=1e-5, rtol=0)
    torch.testing.assert_close(unet_output(unet2, family), want_unet, atol=1e-5, rtol=0)


def test_pt_files_round_trip_and_get_normal_permissions(tmp_path):
    te, _, unet = tiny("sd1")
    network = create_network(1.0, 4, 2, None, te, unet)
    randomise(network)
    network.save_weights(str(tmp_path / "a.pt"), None, None)
    network.save_weights(str(tmp_path / "a.safetensors"), None, None)
    other = create_network(1.0, 4, 2, None, te, unet)
    assert other.load_weights(str(tmp_path / "a.pt")).unexpected_keys == []
    for key, value in network.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o666 & ~umask


def test_sdxl_load_accepts_diffusers_style_names_but_not_both(tmp_path):
    network, path, _, _ = saved_network("sdxl", tmp_path)
    tensors = load_file(path)
    renamed = {}
    for lora in network.unet_loras:  # lora_unet_input_blocks_3_1_... -> lora_unet_down_blocks_1_attentions_0_...
        diffusers_name = "lora_unet_" + lora.module_path.replace(".", "_")
        assert diffusers_name != lora.lora_name
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            renamed[diffusers_name + suffix] = tensors.pop(lora.lora_name + suffix)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in renamed
    renamed.update(tensors)  # text encoder keys unchanged
    te_arg, _, unet = tiny("sdxl")
    other = create_network(1.0, 4, 2, None, te_arg, unet)
    info = other.load_file_state_dict(renamed)
    assert info.missing_keys == [] and info.unexpected_keys == []
    for lora in network.unet_loras:
        torch.testing.assert_close(getattr(other, lora.lora_name).lora_up.weight, lora.lora_up.weight)

    mixed = dict(renamed)
    first = network.unet_loras[0]
    mixed[first.lora_name + ".lora_up.weight"] = first.lora_up.weight.detach()
    with pytest.raises(UserError, match="one naming style"):
        other.load_file_state_dict(mixed)


def test_load_rank_mismatch_and_foreign_file_are_user_errors(tmp_path):
    _, path_sd1, _, _ = saved_network("sd1", tmp_path)
    te, _, unet = tiny("sd1")
    with pytest.raises(UserError, match="--dim_from_weights"):
        create_network(1.0, 8, 2, None, te, unet).load_weights(path_sd1)
    te, _, unet = tiny("sd3")
    with pytest.raises(UserError, match="none of the"):
        create_network(1.0, 4, 2, None, te, unet).load_weights(path_sd1)
    with pytest.raises(UserError, match="file not found"):
        create_network(1.0, 4, 2, None, te, unet).load_weights(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("family, network_args", [("sd1", {"conv_dim": "2", "conv_alpha": "1"}), ("sd3", {})])
def test_create_network_from_weights_takes_dims_and_alphas_from_file(family, network_args, tmp_path):
    network, path, tes, unet = saved_network(family, tmp_path, **network_args)
    want = unet_output(unet, family), te_output(tes[0])
    network.restore()

    te_arg, tes2, unet2 = tiny(family)
    built, weights = create_network_from_weights(1.0, path, None, te_arg, unet2, rank_dropout="0.1")
    assert sorted(built.state_dict()) == sorted(network.state_dict())  # same modules, alpha filled for PEFT
    assert len(built.unet_loras) == len(network.unet_loras)
    assert len(built.text_encoder_loras) == len(network.text_encoder_loras)
    ranks = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in built.unet_loras}
    for m in network.unet_loras:
        # kohya files carry alpha; PEFT (sd3) files have none: alpha = rank with the scale baked into B
        assert ranks[m.lora_name] == ((m.lora_dim, float(m.alpha)) if family == "sd1" else (m.lora_dim, m.lora_dim))
    assert all(m.rank_dropout == 0.1 for m in built.unet_loras)
    built.apply_to(te_arg, unet2)
    built.load_state_dict(weights)
    built.eval()
    torch.testing.assert_close(unet_output(unet2, family), want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_output(tes2[0]), want[1], atol=1e-5, rtol=0)


def test_save_dtype_metadata_and_hashes(tmp_path):
    te, _, unet = tiny("sd1")
    network = create_network(1.0, 4, 2, None, te, unet)
    network.apply_to(te, unet)
    randomise(network)
    path = str(tmp_path / "half.safetensors")
    network.save_weights(path, torch.float16, {"ss_network_dim": "4", "ss_network_alpha": 2.0, "user_note": "x"})
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    meta = file_metadata(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["user_note"] == "x"
    raw = open(path, "rb").read()
    header_len = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()  # tensor bytes only
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"  # file < 1 MiB


def test_hashes_follow_kohya_definitions():
    """model hash ignores all metadata; legacy hash = sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the file
    serialised with the ss_* metadata only (user metadata does not change either hash)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.lora_down.weight": torch.randn(300_000, generator=g), "a.alpha": torch.tensor(4.0)}
    ss_only = {"ss_network_dim": "4"}
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, {**ss_only, "user": "anything"})
    raw = save(tensors, ss_only)
    assert len(raw) > 0x110000
    assert legacy_hash == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    header_len = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert precalculate_safetensors_hashes(tensors, ss_only) == (model_hash, legacy_hash)
    other_ss = precalculate_safetensors_hashes(tensors, {"ss_network_dim": "4", "ss_seed": "12345"})
    assert other_ss[0] == model_hash and other_ss[1] != legacy_hash  # header grew: legacy window moved


def test_save_is_atomic_when_writer_fails(tmp_path, monkeypatch):
    te, _, unet = tiny("sd1")
    network = create_network(1.0, 4, 2, None, te, unet)
    network.apply_to(te, unet)
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, torch.float32, None)
    before = open(path, "rb").read()

    def failing_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    randomise(network)
    monkeypatch.setattr(lora_mod, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(path, torch.float32, {"ss_x": "1"})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # the temp file is gone
    monkeypatch.undo()
    network.save_weights(path, torch.float32, None)
    assert open(path, "rb").read() != before


# ---------------------------------------------------------------------------------------------------------
# Training API
# ---------------------------------------------------------------------------------------------------------
def test_optimizer_param_groups_per_text_encoder_and_denoiser():
    te_arg, _, unet = tiny("sdxl")
    network = create_network(1.0, 4, 1, None, te_arg, unet, loraplus_unet_lr_ratio="16")
    network.apply_to(te_arg, unet)
    groups = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    n_te1 = sum(m.component == "text_encoder" for m in network.text_encoder_loras)
    n_te2 = sum(m.component == "text_encoder_2" for m in network.text_encoder_loras)
    n_unet = len(network.unet_loras)
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4, 1e-4 * 16]
    assert [len(g["params"]) for g in groups] == [2 * n_te1, 2 * n_te2, n_unet, n_unet]  # LoRA+: ups apart
    assert all(p is m.lora_up.weight for p, m in zip(groups[3]["params"], network.unet_loras))
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in network.get_trainable_params())

    groups = network.prepare_optimizer_params(0, None, 1e-3)  # TE lr 0: frozen
    assert len(groups) == 2 and all(g["lr"] in (1e-3, 1.6e-2) for g in groups)
    assert not any(p.requires_grad for m in network.text_encoder_loras for p in m.parameters())


def test_apply_unet_only_drops_text_encoder_modules(tmp_path):
    te, tes, unet = tiny("sd1")
    base_te = te_output(te)
    network = create_network(1.0, 4, 2, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    randomise(network)
    assert network.text_encoder_loras == []
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    torch.testing.assert_close(te_output(te), base_te)
    path = str(tmp_path / "u.safetensors")
    network.save_weights(path, None, None)
    assert all(k.startswith("lora_unet_") for k in file_keys(path))


def test_merge_to_bakes_the_update_into_the_base_weights():
    te, _, unet = tiny("sd1")
    network = create_network(0.7, 4, 2, None, te, unet, conv_dim="2")
    network.apply_to(te, unet)
    randomise(network)
    with_lora = unet_output(unet, "sd1"), te_output(te)
    network.merge_to()
    assert not any(m.is_applied for m in network.unet_loras + network.text_encoder_loras)
    torch.testing.assert_close(unet_output(unet, "sd1"), with_lora[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_output(te), with_lora[1], atol=1e-5, rtol=0)


def test_set_multiplier_scales_the_update():
    te, _, unet = tiny("sd1")
    base = te_output(te)
    network = create_network(1.0, 4, 2, None, te, unet)
    network.apply_to(te, unet)
    randomise(network)
    full = te_output(te)
    network.set_multiplier(0.0)
    torch.testing.assert_close(te_output(te), base)
    network.set_multiplier(1.0)
    torch.testing.assert_close(te_output(te), full)

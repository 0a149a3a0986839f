"""networks.lora_sd3: KS's key names on our diffusers MMDiT, fused qkv split right, KS files load, PEFT files load in
diffusers.

KS's naming rule (sd-scripts networks/lora_sd3.py create_modules on library/sd3_models.py's MMDiT): a module
named ``lora_unet_<SAI path with '.' -> '_'>`` for every nn.Linear inside a SingleDiTBlock (joint_blocks.N.
{context_block,x_block}), plus with emb_dims the embedders / final layer (x_embedder is a conv). The SAI state
dict of our tiny model (library/sd3_convert.mmdit_to_sai, the inverse of diffusers' converter) lists exactly those
modules: a ≥2-d weight is a Linear / Conv2d, 1-d weights are norms.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.sd3_convert import MMDIT_PREFIX, mmdit_to_sai
from library.tiny_models import build_sd3, build_sd35
from networks import lora_sd3
from tests.test_lora_diffusers import CapturedWarnings, count_peft_layers, sample

ALL_EMB = {"emb_dims": "[4,4,4,4,4,4]"}


def _pipe(variant: str):
    pipe = build_sd3(seed=0) if variant == "sd3" else build_sd35(variant, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def _ks_names_from_sai(transformer) -> set[str]:
    """KS's rule applied to SAI's MMDiT: every Linear / Conv weight, named lora_unet_<path>."""
    sai = mmdit_to_sai(transformer.state_dict(), len(transformer.transformer_blocks))
    return {"lora_unet_" + k[len(MMDIT_PREFIX):-len(".weight")].replace(".", "_")
            for k, v in sai.items() if k.endswith(".weight") and v.dim() >= 2}


def _randomise(network, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)


@pytest.mark.parametrize("variant", ["sd3", "sd35_medium", "sd35_large"])
def test_every_ks_module_of_the_mmdit_is_named_as_ks_names_it(variant):
    pipe = _pipe(variant)
    network = lora_sd3.create_network(1.0, 4, 1, None, _encoders(pipe), pipe.transformer, **ALL_EMB)
    names = [lora.lora_name for lora in network.unet_loras]
    assert len(names) == len(set(names))
    assert set(names) == _ks_names_from_sai(pipe.transformer)
    if variant == "sd35_medium":  # MMDiT-X: the dual-attention blocks' attn2
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in names
    # without emb_dims: the joint blocks only (KS default)
    default = lora_sd3.create_network(1.0, 4, 1, None, _encoders(pipe), pipe.transformer)
    assert {l.lora_name for l in default.unet_loras} == {n for n in names if "_joint_blocks_" in n}


def test_text_encoder_names_and_train_t5xxl():
    pipe = _pipe("sd3")
    plain = lora_sd3.create_network(1.0, 4, 1, None, _encoders(pipe), pipe.transformer)
    prefixes = {l.lora_name.split("_text_model_")[0] for l in plain.text_encoder_loras}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in {l.lora_name for l in plain.text_encoder_loras}
    with_t5 = lora_sd3.create_network(1.0, 4, 1, None, _encoders(pipe), pipe.transformer, train_t5xxl="True")
    t5 = {l.lora_name for l in with_t5.text_encoder_loras if l.lora_name.startswith("lora_te3_")}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5


def test_type_dims_and_train_block_indices_as_ks():
    pipe = _pipe("sd3")
    network = lora_sd3.create_network(1.0, 4, 1, None, _encoders(pipe), pipe.transformer, x_mlp_dim="0",
                                      context_attn_dim="8", train_block_indices="1")
    dims = {l.lora_name: l.lora_dim for l in network.unet_loras}
    assert all("_joint_blocks_1_" in n for n in dims)
    assert not any("x_block_mlp" in n for n in dims)
    assert dims["lora_unet_joint_blocks_1_context_block_attn_qkv"] == 8
    assert dims["lora_unet_joint_blocks_1_x_block_attn_qkv"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd3", "sd35_medium"])
def test_fused_qkv_and_swapped_adaln_match_a_fused_reference(variant):
    """The merged KS file, applied in SAI space (W_qkv + s·U·D on the fused weight) and converted to diffusers by
    diffusers' own converter, equals our merge into the split modules; the hooked forward equals the merge."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    pipe = _pipe(variant)
    transformer = pipe.transformer
    network = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), transformer, **ALL_EMB)
    _randomise(network)
    ks = network.state_dict()

    sai = mmdit_to_sai(transformer.state_dict(), len(transformer.transformer_blocks))
    for lora in network.unet_loras:
        key = MMDIT_PREFIX + lora.lora_name[len("lora_unet_"):]
        # the KS name is the SAI path with '_' for '.': find the SAI weight it names
        match = [k for k in sai if k.endswith(".weight") and k[:-len(".weight")].replace(".", "_") == key.replace(".", "_")]
        assert len(match) == 1, lora.lora_name
        down, up = ks[f"{lora.lora_name}.lora_down.weight"], ks[f"{lora.lora_name}.lora_up.weight"]
        scale = float(ks[f"{lora.lora_name}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).view(sai[match[0]].shape) * scale
        sai[match[0]] = sai[match[0]] + delta
    reference = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))

    x = torch.randn(1, 16, 8, 8)
    cond = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 20, 64),
                pooled_projections=torch.randn(1, 64), return_dict=False)
    network.apply_to(_encoders(pipe), transformer)
    with torch.no_grad():
        hooked = transformer(hidden_states=x, **cond)[0]
    network.merge_to()
    merged_sd = transformer.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(merged_sd[key], value, atol=1e-5, rtol=0, msg=key)
    with torch.no_grad():
        merged = transformer(hidden_states=x, **cond)[0]
    torch.testing.assert_close(hooked, merged, atol=1e-4, rtol=0)


def test_ks_layout_file_loads_with_no_unmatched_key(tmp_path):
    """A file in KS's layout (every module, T5 too, written key by key as KS's save_weights does) loads into a
    fresh network with nothing missing and nothing unexpected, by --network_weights and by --dim_from_weights."""
    pipe = _pipe("sd35_medium")
    source = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, train_t5xxl="True",
                                     **ALL_EMB)
    _randomise(source)
    file = str(tmp_path / "ks.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, file)
    keys = set(load_file(file))
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in keys)

    fresh = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, train_t5xxl="True",
                                    **ALL_EMB)
    info = fresh.load_weights(file)
    assert info.missing_keys == [] and info.unexpected_keys == []
    for key, value in source.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)

    from_file, weights = lora_sd3.create_network_from_weights(1.0, file, None, _encoders(pipe), pipe.transformer)
    info = from_file.load_state_dict(weights, strict=True)
    assert set(from_file.state_dict()) == keys


@pytest.mark.slow
def test_kohya_output_round_trips_and_peft_round_trips(tmp_path):
    pipe = _pipe("sd3")
    network = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, **ALL_EMB)
    _randomise(network)
    for file_format in ("kohya", "peft"):
        network.set_file_format(file_format)
        file = str(tmp_path / f"{file_format}.safetensors")
        network.save_weights(file, torch.float32, {})
        fresh = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, **ALL_EMB)
        info = fresh.load_weights(file)
        assert info.missing_keys == [] and info.unexpected_keys == [], file_format
        for lora in network.unet_loras + network.text_encoder_loras:
            torch.testing.assert_close(getattr(fresh, lora.lora_name).delta_weight(), lora.delta_weight(),
                                       atol=1e-6, rtol=0)


@pytest.mark.slow
def test_peft_output_loads_in_diffusers_with_every_module_attached(tmp_path):
    pipe = _pipe("sd35_medium")
    base = sample(pipe)
    pipe_diffusers = copy.deepcopy(pipe)
    network = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, **ALL_EMB)
    network.apply_to(_encoders(pipe), pipe.transformer)
    _randomise(network)
    ours = sample(pipe)
    file = str(tmp_path / "peft.safetensors")
    network.save_weights(file, torch.float32, {})   # default format: peft
    n_modules = len({k.rsplit(".", 2)[0] for k in load_file(file)})
    assert n_modules == sum(len(l.target.parts) for l in network.unet_loras + network.text_encoder_loras)
    with CapturedWarnings() as captured:
        pipe_diffusers.load_lora_weights(file)
    assert captured.about_keys() == []
    assert count_peft_layers(pipe_diffusers) == n_modules
    assert (ours - base).abs().max() > 0.1
    torch.testing.assert_close(sample(pipe_diffusers), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("args, message", [
    ({"emb_dims": "[4,4]"}, "must be 6 ranks"),
    ({"x_attn_dim": "-1"}, "x_attn_dim"),
    ({"conv_dim": "4"}, "no conv layer"),
    ({"split_qkv": "True"}, "split_qkv"),
    ({"train_blocks": "all"}, "unknown key"),
])
def test_network_args_are_checked_before_any_model_loads(args, message):
    with pytest.raises(UserError, match=message):
        lora_sd3.validate_network_args(args, "sd3")


def test_refused_for_other_families():
    with pytest.raises(UserError, match="not sdxl"):
        lora_sd3.validate_network_args({}, "sdxl")


def test_peft_format_refuses_t5_modules():
    pipe = _pipe("sd3")
    network = lora_sd3.create_network(1.0, 4, 2, None, _encoders(pipe), pipe.transformer, train_t5xxl="True")
    with pytest.raises(UserError, match="T5"):
        network.set_file_format("peft")
    network.set_file_format("kohya")


def test_lora_format_goes_to_the_network_or_is_refused():
    from types import SimpleNamespace

    from networks import lora_format

    class OwnFormat:
        file_format = "peft"

    lora_format.apply(OwnFormat(), SimpleNamespace(lora_format="peft", network_module="networks.lora"))
    with pytest.raises(UserError, match="networks.lora_sd3"):
        lora_format.apply(OwnFormat(), SimpleNamespace(lora_format="kohya", network_module="networks.lora"))
    lora_format.apply(OwnFormat(), SimpleNamespace(network_module="networks.lora"))   # family without the flag

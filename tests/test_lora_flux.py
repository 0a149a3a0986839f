"""networks.lora_flux: KS key names on diffusers Flux / Chroma modules, the fused-qkv mapping checked against
diffusers' own KS-Flux converter (output equality after load_lora_weights; the full-width single-block split),
split_qkv files, network_args rank rules, loading from weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library import tiny_flux
from library.errors import UserError
from networks import lora_flux


@pytest.fixture(scope="module")
def pipes():
    return {variant: tiny_flux.build(variant) for variant in ("dev", "chroma")}


def encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else pipe.text_encoder


def randomise(network, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        if p.dim() == 2:
            p.data = torch.randn(p.shape, generator=generator) * 0.1


def transformer_inputs(pipe, tokens: int = 4, text: int = 8):
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, tokens, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, text, 32, generator=generator), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    if not hasattr(pipe.transformer, "distilled_guidance_layer"):
        kwargs.update(pooled_projections=torch.randn(1, 32, generator=generator), guidance=torch.tensor([3.5]))
    return kwargs


# ----------------------------------------------------------------------------------------------
# Key names
# ----------------------------------------------------------------------------------------------
def test_ks_names_of_flux_and_chroma(pipes):
    dev = lora_flux.create_network(1.0, 4, 1, None, encoders(pipes["dev"]), pipes["dev"].transformer)
    names = [lora.lora_name for lora in dev.unet_loras]
    double = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
              "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    assert names == ([f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in double]
                     + [f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2",
                                                                                         "modulation_lin")])
    te = [lora.lora_name for lora in dev.text_encoder_loras]
    assert te[0] == "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" and len(te) == 12   # CLIP-L only
    chroma = lora_flux.create_network(1.0, 4, 1, None, encoders(pipes["chroma"]), pipes["chroma"].transformer,
                                      train_t5xxl="True")
    chroma_names = {lora.lora_name for lora in chroma.unet_loras}
    assert len(chroma_names) == 2 * 8 + 2 * 2 and not any("mod" in n for n in chroma_names)
    assert all(l.lora_name.startswith("lora_te3_encoder_block_") for l in chroma.text_encoder_loras)
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0" in {l.lora_name for l in chroma.text_encoder_loras}


def test_fused_module_shapes(pipes):
    network = lora_flux.create_network(1.0, 4, 1, None, encoders(pipes["dev"]), pipes["dev"].transformer)
    sd = network.file_state_dict()
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 4 * 32, 4)
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4, 32)
    assert set(k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in sd) == {"lora_down", "lora_up",
                                                                                          "alpha"}


# ----------------------------------------------------------------------------------------------
# diffusers loads the files
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_diffusers_load_lora_weights_computes_what_we_compute(tmp_path, variant):
    """Every module of the file attaches in diffusers (LoRA layers = our parts) and the transformer's output
    with diffusers' loaded LoRA equals ours exactly. Single-block linear1 is covered at full width below:
    diffusers' converter hard-codes the 3072 width for it, so the tiny model trains double blocks here."""
    from peft.tuners.lora import LoraLayer

    pipe = tiny_flux.build(variant)
    network = lora_flux.create_network(1.0, 4, 2.0, None, encoders(pipe), pipe.transformer, train_blocks="double")
    network.apply_to(encoders(pipe), pipe.transformer, True, True)
    randomise(network)
    kwargs = transformer_inputs(pipe)
    with torch.no_grad():
        ours = pipe.transformer(**kwargs)[0]
        network.restore()
        base = pipe.transformer(**kwargs)[0]
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, None, {})
    pipe.load_lora_weights(path)
    with torch.no_grad():
        theirs = pipe.transformer(**kwargs)[0]
    parts = sum(len(lora.module_paths) for lora in network.unet_loras)
    assert sum(isinstance(m, LoraLayer) for m in pipe.transformer.modules()) == parts
    te_layers = sum(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert te_layers == (len(network.text_encoder_loras) if variant == "dev" else 0)
    assert (ours - base).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_single_block_linear1_split_matches_diffusers_converter_at_full_width():
    """lora_unet_single_blocks_N_linear1 (q|k|v|mlp = 3072·3 + 12288 rows): diffusers' KS converter gives each
    diffusers module the ΔW rows our module adds to it (meta Linears: no memory for the base weights)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    org = [torch.nn.Linear(3072, d, device="meta") for d in (3072, 3072, 3072, 12288)]
    lora = lora_flux.FluxLoRAModule("lora_unet_single_blocks_0_linear1", org, lora_dim=2, alpha=1.0)
    generator = torch.Generator().manual_seed(0)
    lora.lora_up.weight.data = torch.randn(lora.lora_up.weight.shape, generator=generator)
    down, up = lora.fused_weights()
    file = {"lora_unet_single_blocks_0_linear1.lora_down.weight": down.clone(),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": up.clone(),
            "lora_unet_single_blocks_0_linear1.alpha": lora.alpha.clone()}
    converted = _convert_kohya_flux_lora_to_diffusers(file)
    delta = lora.delta_weight()
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        a = converted[f"transformer.single_transformer_blocks.0.{part}.lora_A.weight"]
        b = converted[f"transformer.single_transformer_blocks.0.{part}.lora_B.weight"]
        assert torch.allclose(b @ a, delta[lora.rows[i]], atol=1e-5), part


# ----------------------------------------------------------------------------------------------
# split_qkv
# ----------------------------------------------------------------------------------------------
def test_split_qkv_writes_ks_merged_file_and_reads_it_back(pipes, tmp_path):
    pipe = pipes["dev"]
    split = lora_flux.create_network(1.0, 2, 1, None, encoders(pipe), pipe.transformer, split_qkv="True")
    randomise(split)
    path = str(tmp_path / "split.safetensors")
    split.save_weights(path, None, {})
    sd = load_file(path)
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert down.shape == (3 * 2, 32) and up.shape == (3 * 32, 3 * 2)
    assert torch.equal(up[:32, 2:], torch.zeros(32, 4))              # block-diagonal, as KS merges
    again = lora_flux.create_network(1.0, 2, 1, None, encoders(pipe), pipe.transformer, split_qkv="True")
    info = again.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(split.state_dict().values(), again.state_dict().values()))
    fused, weights = lora_flux.create_network_from_weights(1.0, path, None, encoders(pipe), pipe.transformer)
    fused.load_state_dict(weights)
    for a, b in zip(split.unet_loras, fused.unet_loras):
        assert torch.allclose(a.delta_weight(), b.delta_weight(), atol=1e-6)


def test_dense_file_into_split_network_is_refused(pipes, tmp_path):
    pipe = pipes["dev"]
    dense = lora_flux.create_network(1.0, 6, 1, None, encoders(pipe), pipe.transformer)
    randomise(dense)
    path = str(tmp_path / "dense.safetensors")
    dense.save_weights(path, None, {})
    split = lora_flux.create_network(1.0, 2, 1, None, encoders(pipe), pipe.transformer, split_qkv="True")
    with pytest.raises(UserError, match="block-diagonal"):
        split.load_weights(path)


# ----------------------------------------------------------------------------------------------
# network_args
# ----------------------------------------------------------------------------------------------
def ranks(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.unet_loras}


def test_per_type_ranks_blocks_and_in_dims(pipes):
    t = pipes["dev"].transformer
    r = ranks(lora_flux.create_network(1.0, 8, 1, None, None, t, img_attn_dim="2", single_dim="0",
                                       train_double_block_indices="1", in_dims="[3,0,0,1,5]"))
    assert r["lora_unet_double_blocks_1_img_attn_qkv"] == 2 and r["lora_unet_double_blocks_1_img_mlp_0"] == 8
    assert not any(n.startswith("lora_unet_double_blocks_0_") for n in r)
    assert not any(n.endswith(("linear1", "linear2")) for n in r)
    assert r["lora_unet_single_blocks_0_modulation_lin"] == 8
    assert (r["lora_unet_img_in"], r["lora_unet_txt_in"], r["lora_unet_guidance_in_in_layer"]) == (3, 5, 1)
    assert "lora_unet_time_in_in_layer" not in r
    single = ranks(lora_flux.create_network(1.0, 4, 1, None, None, t, train_blocks="single"))
    assert single and all("single_blocks" in n for n in single)
    reg = ranks(lora_flux.create_network(1.0, 4, 1, None, None, t, network_reg_dims="img_attn=16"))
    assert reg["lora_unet_double_blocks_0_img_attn_proj"] == 16 and reg["lora_unet_double_blocks_0_img_mlp_0"] == 4


def test_reg_lrs_and_loraplus_param_groups(pipes):
    network = lora_flux.create_network(1.0, 4, 1, None, encoders(pipes["dev"]), pipes["dev"].transformer,
                                       network_reg_lrs="single_blocks=1e-3", loraplus_lr_ratio="4")
    groups = network.prepare_optimizer_params([5e-5], None, 1e-4)
    lrs = sorted({g.get("lr") for g in groups})
    assert lrs == sorted({5e-5, 5e-5 * 4, 1e-4, 4e-4, 1e-3, 4e-3})
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("kwargs,match", [(dict(ggpo_sigma="0.03"), "GGPO"), (dict(conv_dim="4"), "convolutions"),
                                          (dict(train_blocks="half"), "train_blocks"), (dict(in_dims="[1,2]"), "5 ranks"),
                                          (dict(train_double_block_indices="0-5"), "outside"),
                                          (dict(img_atn_dim="2"), "img_attn_dim")])
def test_bad_network_args_are_user_errors(pipes, kwargs, match):
    with pytest.raises(UserError, match=match):
        lora_flux.create_network(1.0, 4, 1, None, None, pipes["dev"].transformer, **kwargs)


def test_from_weights_recreates_ranks_and_alphas(pipes, tmp_path):
    pipe = pipes["dev"]
    network = lora_flux.create_network(1.0, 4, 2.0, None, encoders(pipe), pipe.transformer, txt_mlp_dim="2")
    randomise(network)
    path = str(tmp_path / "a.safetensors")
    network.save_weights(path, torch.float16, {"ss_network_dim": "4"})
    again, weights = lora_flux.create_network_from_weights(1.0, path, None, encoders(pipe), pipe.transformer)
    assert ranks(again) == ranks(network)
    assert {float(l.alpha) for l in again.unet_loras} == {2.0}
    info = again.load_state_dict(weights, strict=False)
    assert not info.unexpected_keys and not [k for k in info.missing_keys if "lora" in k]

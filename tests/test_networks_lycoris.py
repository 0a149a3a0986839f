"""--network_module lycoris.kohya: its network_args checked before any model loads."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from library import checkpointing
from library.errors import UserError
from networks import network_args as network_args_lib
from networks.lycoris_support import LYCORIS_KEYS

lycoris_kohya = pytest.importorskip("lycoris.kohya")


def test_known_keys_are_exactly_what_lycoris_reads():
    """Our key list against the installed LyCORIS source: a LyCORIS upgrade that adds or drops a key fails here."""
    source = inspect.getsource(lycoris_kohya.create_network)
    read = set(re.findall(r'kwargs\.get\(\s*"([a-z0-9_]+)"', source))
    deprecated = set(__import__("lycoris.wrapper", fromlist=["deprecated_arg_dict"]).deprecated_arg_dict)
    assert read | deprecated == set(LYCORIS_KEYS)


@pytest.mark.parametrize("items", [
    ["algo=lokr", "factor=8", "conv_dim=4", "conv_alpha=2", "preset=attn-mlp", "dora_wd=True"],
    ["algo=loha", "use_tucker=False", "dropout=0.1", "rank_dropout=0.05", "module_dropout=0.1"],
    ["algo=diag-oft", "constraint=0.1", "rescaled=True"],
    ["algo=boft"], ["algo=locon", "dora_wd=True", "wd_on_output=False"],
])
def test_lycoris_recipes_pass(items):
    assert network_args_lib.validate("lycoris.kohya", items, "sdxl", network_dim=8, network_alpha=4)


@pytest.mark.parametrize("items, message", [
    (["algo=lokrr"], "did you mean 'lokr'"),
    (["algo=lokr", "facter=8"], "did you mean 'factor'"),
    (["algo=loha", "factor=8"], "factor does nothing with algo=loha"),
    (["algo=boft", "dora_wd=True"], "dora_wd does nothing with algo=boft"),
    (["dora_wd=1"], "True or False"),
    (["preset=attn-mpl"], "preset='attn-mpl'"),
    (["algo=lokr", "factor=0"], "factor='0'"),
    (["rank_dropout=2"], "rank_dropout='2'"),
    (["block_dims=4,4"], "networks.lora option"),
    (["algo=full"], "algo=full does not run with LyCORIS 3.4.0"),
])
def test_lycoris_mistakes_are_named(items, message):
    with pytest.raises(UserError, match="--network_args") as err:
        network_args_lib.validate("lycoris.kohya", items, "sd1", network_dim=4, network_alpha=1)
    assert message in str(err.value)


def test_a_malformed_preset_file_is_refused_before_loading(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('unet_target_module = ["Attention\n')  # TOML syntax error: an unterminated string
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("unet_target_modules = []\n")  # valid TOML, a key LyCORIS does not know
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("module_algo_map = 3\n")  # a known key whose value LyCORIS cannot read (it crashed)
    good = tmp_path / "good.toml"
    good.write_text('unet_target_module = ["Transformer2DModel"]\ntext_encoder_target_module = []\n')
    for path in (broken, unknown, wrong):
        with pytest.raises(UserError, match=f"preset='{path}' is not a usable LyCORIS preset file"):
            network_args_lib.validate("lycoris.kohya", [f"preset={path}"], "sd1", network_dim=4, network_alpha=1)
    assert network_args_lib.validate("lycoris.kohya", [f"preset={good}"], "sd1", network_dim=4, network_alpha=1)


def test_lycoris_flag_mistakes():
    with pytest.raises(UserError, match="--network_dropout"):
        network_args_lib.validate("lycoris.kohya", ["algo=lokr"], "sd1", network_dropout=0.1)
    with pytest.raises(UserError, match="--network_dim"):
        network_args_lib.validate("lycoris.kohya", ["algo=lokr"], "sd1", network_dim=0)


# ---------------------------------------------------------------------------------------------------------
# end to end: train, save, resume bit-exactly, reload with LyCORIS's own loader
# ---------------------------------------------------------------------------------------------------------
LYCORIS_RUNS = {
    "lokr": ["algo=lokr", "factor=4", "conv_dim=4", "conv_alpha=2"],
    "loha": ["algo=loha", "conv_dim=2", "conv_alpha=1"],
    "dora": ["algo=locon", "dora_wd=True", "conv_dim=2", "conv_alpha=1"],
}


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), cond).sample


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(LYCORIS_RUNS))
def test_lycoris_trains_saves_resumes_bit_exactly_and_reloads_in_lycoris(algo, sd15, dataset, tmp_path):
    import json

    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris_from_weights
    from lycoris.kohya import create_network as lycoris_create_network
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from networks.lycoris_support import load_weights
    from tests.train_helpers import base_argv, run_inprocess

    common = dict(network_module="lycoris.kohya", network_args=LYCORIS_RUNS[algo], network_train_unet_only=True,
                  save_every_n_steps=2, save_state=True, train_batch_size=1, scale_weight_norms=5.0)
    full = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "full"), steps=4, **common))
    state = str(tmp_path / "full" / (checkpointing.step_name("lora", 2) + "-state"))
    resumed = run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path / "resumed"), steps=4, resume=state,
                                             **common))
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is bit-exact
    with safe_open(full, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["sshs_model_hash"]
    assert json.loads(metadata["ss_network_args"])["algo"] == LYCORIS_RUNS[algo][0].split("=")[1]
    kinds = {k.split(".", 1)[1] for k in a}
    expected = {"lokr": "lokr_w1", "loha": "hada_w1_a", "dora": "dora_scale"}[algo]
    assert expected in kinds, kinds  # LyCORIS's own key names

    # (a) LyCORIS's kohya network built like the trainer, our loader; (b) LyCORIS's create_lycoris_from_weights
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    base = unet_output(unet)
    kwargs = dict(a.split("=", 1) for a in LYCORIS_RUNS[algo])
    network = lycoris_create_network(1.0, 4, 2, None, None, unet, **kwargs)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    load_weights(network, full, unet)
    ours = unet_output(unet)
    assert (ours - base).abs().max() > 1e-4  # the trained network changes the UNet

    unet2 = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    renamed = str(tmp_path / "lycoris-prefix.safetensors")  # its standalone loader names modules 'lycoris_<path>'
    save_file({k.replace("lora_unet_", "lycoris_", 1): v for k, v in a.items()}, renamed)
    lycoris_net, _ = create_lycoris_from_weights(1.0, renamed, unet2)
    assert len(lycoris_net.loras) == len(network.unet_loras)
    lycoris_net.apply_to()
    torch.testing.assert_close(unet_output(unet2), ours, rtol=0, atol=1e-5)


def test_lycoris_network_weights_with_unknown_modules_are_refused(tmp_path):
    from lycoris.kohya import create_network as lycoris_create_network
    from safetensors.torch import save_file

    from library.tiny_models import build_sd15
    from networks.lycoris_support import load_weights

    unet = build_sd15(seed=0).unet
    network = lycoris_create_network(1.0, 4, 2, None, None, unet, algo="lokr")
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    good = {k: v.clone() for k, v in network.state_dict().items()}
    path = str(tmp_path / "ok.safetensors")
    save_file(good, path)
    assert load_weights(network, path, unet) == {}
    save_file({**good, "lora_unet_nowhere.lokr_w1": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="lora_unet_nowhere"):
        load_weights(network, path, unet)


def test_ks_trained_sdxl_lycoris_file_with_sai_names_loads(tmp_path):
    """KS trains SDXL on its SAI-layout UNet, so its LyCORIS files say input_blocks_4_1_...; ours say
    down_blocks_1_attentions_0_...: such a file loads into every module, with the same tensors."""
    from lycoris.kohya import create_network as lycoris_create_network
    from safetensors.torch import save_file

    from library.tiny_models import build_sdxl
    from networks.lycoris_support import load_weights, sai_to_diffusers_names

    unet = build_sdxl(seed=0).unet
    network = lycoris_create_network(1.0, 4, 2, None, None, unet, algo="loha", conv_dim="2")
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(0)
    wanted = {k: torch.randn(v.shape, generator=g) for k, v in network.state_dict().items()}
    to_sai = {ours: sai for sai, ours in sai_to_diffusers_names(unet).items()}
    sai_file = {}
    for key, value in wanted.items():
        module, rest = key.split(".", 1)
        sai_file[f"{to_sai[module]}.{rest}"] = value
    assert any("input_blocks_" in k for k in sai_file) and not any("down_blocks" in k for k in sai_file)
    path = str(tmp_path / "ks_sdxl.safetensors")
    save_file(sai_file, path)
    assert load_weights(network, path, unet) == {}
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], wanted[k]) for k in wanted)


def test_lycoris_full_algo_crashes_in_its_forward_so_it_is_refused():
    """Why algo=full is refused: LyCORIS 3.4.0's FullModule.apply_to deletes the layer's weight and its forward
    then calls the layer's own forward (AttributeError at the first step); bypass_mode is refused by FullModule."""
    from lycoris.kohya import create_network as lycoris_create_network

    class Transformer2DModel(torch.nn.Module):  # a class LyCORIS's default preset targets
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    layer = Transformer2DModel()
    network = lycoris_create_network(1.0, 4, 1, None, None, layer, algo="full")
    network.apply_to(None, layer, apply_text_encoder=False, apply_unet=True)
    assert [type(m).__name__ for m in network.unet_loras] == ["FullModule"]
    assert not hasattr(layer.proj, "weight")
    with pytest.raises(AttributeError, match="weight"):
        layer.proj(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="bypass mode is not supported"):
        lycoris_create_network(1.0, 4, 1, None, None, Transformer2DModel(), algo="full", bypass_mode="True")


# ---------------------------------------------------------------------------------------------------------
# presets: attn-only trains the attention layers on diffusers UNets too
# ---------------------------------------------------------------------------------------------------------
def attention_linears(unet) -> set[str]:
    """LyCORIS names of the Linear layers of every attention module (what KS's attn-only trains in its
    CrossAttention: to_q, to_k, to_v, to_out.0)."""
    return {f"lora_unet_{path}_{leaf}".replace(".", "_") for path, m in unet.named_modules()
            if type(m).__name__ == "Attention" for leaf in ("to_q", "to_k", "to_v", "to_out.0")}


def test_attn_only_preset_trains_every_attention_layer_of_a_diffusers_unet():
    from lycoris.kohya import create_network as lycoris_create_network

    from library.tiny_models import build_sd15

    pipe = build_sd15(seed=0)
    network = network_args_lib.create_network("lycoris.kohya", 1.0, 4, 1, None, pipe.text_encoder, pipe.unet,
                                              algo="lokr", preset="attn-only")  # as the training loop makes it
    unet_modules = {m.lora_name for m in network.unet_loras}
    assert len(unet_modules) == 4 * 2 * sum(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules())
    assert unet_modules == attention_linears(pipe.unet)
    te_modules = {m.lora_name for m in network.text_encoder_loras}
    layers = pipe.text_encoder.config.num_hidden_layers
    assert te_modules == {f"lora_te_{p}_self_attn_{proj}" for p in
                          (f"encoder_layers_{i}" for i in range(layers)) for proj in ("q_proj", "k_proj", "v_proj",
                                                                                       "out_proj")}
    # LyCORIS's own preset names KS's CrossAttention class only: no UNet module on diffusers' Attention
    untranslated = lycoris_create_network(1.0, 4, 1, None, None, pipe.unet, algo="lokr", preset="attn-only")
    assert untranslated.unet_loras == []


def test_preset_translation_only_adds_diffusers_attention():
    from lycoris.config import PRESET

    from networks.lycoris_support import preset_for_diffusers

    for name, preset in PRESET.items():
        translated = preset_for_diffusers(preset)
        expected = preset["unet_target_module"] + (["Attention"] if "CrossAttention" in preset["unet_target_module"]
                                                   else [])
        assert translated == {**preset, "unet_target_module": expected}, name
    assert "_diffusers_" not in "".join(PRESET)  # the private entry is gone after create_network


# ---------------------------------------------------------------------------------------------------------
# --base_weights: the merged model computes what the network computes
# ---------------------------------------------------------------------------------------------------------
def test_loha_and_lokr_merge_delta_is_the_math():
    """LoHa ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha/dim, LoKr ΔW = kron(w1, w2a w2b) · alpha/dim (LyCORIS's papers and
    its forward); LyCORIS 3.4.0's get_diff_weight gives (alpha/dim)² instead."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from networks.lycoris_support import _forward_diff_weight

    g = torch.Generator().manual_seed(0)
    loha = LohaModule("l", torch.nn.Linear(6, 8, bias=False), lora_dim=2, alpha=1)
    lokr = LokrModule("k", torch.nn.Linear(32, 64, bias=False), lora_dim=2, alpha=1, factor=4, decompose_both=False)
    with torch.no_grad():
        for p in list(loha.parameters()) + list(lokr.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    h = {n: p.detach() for n, p in loha.named_parameters()}
    expected = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 0.5
    torch.testing.assert_close(_forward_diff_weight(loha, shape=(8, 6))[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(loha.get_diff_weight(shape=(8, 6))[0], expected * 0.5)  # LyCORIS's: scale twice
    k = {n: p.detach() for n, p in lokr.named_parameters()}
    assert lokr.scale == 0.5 and "lokr_w1" in k and "lokr_w2_a" in k
    expected = torch.kron(k["lokr_w1"], k["lokr_w2_a"] @ k["lokr_w2_b"]) * 0.5
    torch.testing.assert_close(_forward_diff_weight(lokr, shape=(64, 32))[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(lokr.get_diff_weight(shape=(64, 32))[0], expected * 0.5)


MERGE_RUNS = {"locon": dict(algo="locon", conv_dim="2", conv_alpha="1"),
              "loha": dict(algo="loha", conv_dim="2", conv_alpha="1"),
              "lokr": dict(algo="lokr", factor="4", conv_dim="2", conv_alpha="1")}


@pytest.mark.parametrize("algo", sorted(MERGE_RUNS))
def test_base_weights_merge_equals_the_network_forward(algo, tmp_path):
    """--base_weights with --base_weights_multiplier 0.5 and alpha/dim = 0.5: the merged model's output equals the
    output of the model with the network applied at multiplier 0.5 (LyCORIS's merge_to: multiplier 1, and LoHa /
    LoKr with (alpha/dim)²)."""
    from types import SimpleNamespace

    from library import ks_run
    from library.tiny_models import build_sd15
    from networks import network_args as network_args_module

    pipe = build_sd15(seed=0)
    base = (unet_output(pipe.unet), text_output(pipe.text_encoder))
    network = lycoris_kohya.create_network(0.5, 4, 2, None, pipe.text_encoder, pipe.unet, **MERGE_RUNS[algo])
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    hooked = (unet_output(pipe.unet), text_output(pipe.text_encoder))
    path = str(tmp_path / "base.safetensors")
    network_args_module.save_network_weights(network, path, None, {})

    fresh = build_sd15(seed=0)
    args = SimpleNamespace(base_weights=[path], base_weights_multiplier=[0.5], network_module="lycoris.kohya")
    models = SimpleNamespace(text_encoders=[fresh.text_encoder], vae=None, denoiser=fresh.unet)
    ks_run.merge_base_weights(args, models, torch.float32, "cpu")
    merged = (unet_output(fresh.unet), text_output(fresh.text_encoder))
    for h, m, b in zip(hooked, merged, base):
        assert (h - b).abs().max() > 0.1 * h.abs().max()  # a real delta
        assert (m - h).abs().max() <= 1e-5 * h.abs().max()


def text_output(text_encoder) -> torch.Tensor:
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state

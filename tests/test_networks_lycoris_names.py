"""LyCORIS files name modules as KS writes them: SAI paths for the SDXL UNet (KS trains SDXL on its SAI-layout
UNet, library/sdxl_original_unet.py), diffusers paths for SD1/SD2 (KS's SD1 UNet uses them), and CLIP modules under
`text_model_` (KS runs transformers 4). KS's names and our older ones both load; ComfyUI's key rules map every key.

The expected names are computed here independently of networks/lycoris_support.py: the SAI module list comes from
the checkpoint converter (library/ldm_convert.unet_to_ldm), and KS's LyCORIS targets from the block layout of
KS's SAI UNet."""
from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.ldm_convert import unet_to_ldm
from networks import network_args
from networks.lycoris_support import KS_NAMES_ATTRIBUTE, load_weights, prepare_network

lycoris_kohya = pytest.importorskip("lycoris.kohya")

SAI_UNET_PREFIX = "model.diffusion_model."
# LyCORIS's `full` preset (lycoris.config.PRESET, the default) also targets these modules by their diffusers path
PRESET_NAMED = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# In KS's SdxlUNet2DConditionModel every module of input_blocks 1.., middle_block and output_blocks sits inside a
# ResnetBlock2D, Transformer2DModel, Downsample2D or Upsample2D (LyCORIS's target classes); input_blocks.0.0 is
# the bare conv_in.
KS_TARGET_BLOCK = re.compile(r"(input_blocks\.(?!0\.)\d+|middle_block|output_blocks)\.\d+\.")
# comfy/lora.py LORA_CLIP_MAP values (ComfyUI 41444b5236c613ee5ff7d09aa620f94b702f30eb)
COMFY_CLIP_MODULES = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
                      "self_attn_out_proj")


def sai_weight_shapes(unet) -> dict[str, tuple]:
    """SAI module path -> weight shape, from the diffusers -> SAI checkpoint converter."""
    sd = unet_to_ldm(unet.state_dict(), unet.config)
    return {k[len(SAI_UNET_PREFIX):-len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}


def ks_lycoris_unet_modules(unet, conv: bool) -> set[str]:
    """The UNet modules LyCORIS 3.4.0 ('full' preset) names on KS's SAI SDXL UNet: every Linear (2-D weight) and
    1x1 conv inside the target blocks, 3x3 convs when conv_dim > 0; plus the preset's named modules at their SAI
    place (conv_in -> input_blocks.0.0, ...), which LyCORIS finds by name only on the diffusers UNet (see
    docs/networks.md)."""
    names = set()
    for path, shape in sai_weight_shapes(unet).items():
        if KS_TARGET_BLOCK.match(path) and len(shape) in (2, 4) and (conv or len(shape) == 2 or shape[2:] == (1, 1)):
            names.add("lora_unet_" + path.replace(".", "_"))
    if conv:
        state = unet.state_dict()
        for name in PRESET_NAMED:
            (sai_key,) = unet_to_ldm({f"{name}.weight": state[f"{name}.weight"]}, unet.config)
            names.add("lora_unet_" + sai_key[len(SAI_UNET_PREFIX):-len(".weight")].replace(".", "_"))
    return names


def comfyui_unet_keys(unet) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet (ComfyUI 41444b52), its rule for the loaded SAI-layout UNet: each
    state-dict key `diffusion_model.<path>.weight` is reachable as `lora_unet_<path, '.' -> '_'>`."""
    return {"lora_unet_" + path.replace(".", "_"): f"diffusion_model.{path}.weight" for path in sai_weight_shapes(unet)}


def comfyui_clip_keys(prefixes: tuple[str, ...]) -> set[str]:
    """comfy/lora.py model_lora_keys_clip (same commit): lora_te_ (SD1), lora_te1_ / lora_te2_ (SDXL CLIP-L / G)
    + text_model_encoder_layers_<b>_<module> for b < 32."""
    return {f"{p}_text_model_encoder_layers_{b}_{c}" for p in prefixes for b in range(32) for c in COMFY_CLIP_MODULES}


def delta_size(tensors: dict[str, torch.Tensor], module: str) -> tuple[int, int] | None:
    """(rows, row length) of the weight a module's tensors update: LoCon up·down, LoKr w1 ⊗ w2 (LyCORIS keeps a
    conv's w2 flat), full diff; None for the other algorithms."""
    t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == module}
    if "lora_up.weight" in t:
        return t["lora_up.weight"].shape[0], t["lora_down.weight"][0].numel()
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2_rows = t["lokr_w2"].shape[0] if "lokr_w2" in t else t["lokr_w2_a"].shape[0]
        w2_numel = t["lokr_w2"].numel() if "lokr_w2" in t else w2_rows * t["lokr_w2_b"][0].numel()
        return w1.shape[0] * w2_rows, w1.shape[1] * (w2_numel // w2_rows)
    if "diff" in t:
        return t["diff"].shape[0], t["diff"][0].numel()
    return None


ALGOS = {
    "locon": dict(algo="locon", conv_dim="2", conv_alpha="1"),
    "lokr": dict(algo="lokr", factor="4", conv_dim="2", conv_alpha="1"),
    "loha": dict(algo="loha", conv_dim="2", conv_alpha="1"),
    "dora": dict(algo="locon", dora_wd="True"),
    "diag-oft": dict(algo="diag-oft", conv_dim="2"),
    "train_norm": dict(algo="locon", train_norm="True", conv_dim="2"),
}


def assert_file_restores(network, path: str, unet, expected: dict[str, torch.Tensor]) -> None:
    """Zero the network, load `path` into it: no module skipped, every tensor equal to `expected`."""
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
    assert load_weights(network, path, unet) == {}
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def sdxl_with_network(kwargs: dict, randomise: bool, pipe=None):
    from library.tiny_models import build_sdxl

    pipe = pipe or build_sdxl(seed=0)
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    network = lycoris_kohya.create_network(1.0, 4, 2, None, tes, pipe.unet, **kwargs)
    network.apply_to(tes, pipe.unet, apply_text_encoder=True, apply_unet=True)
    prepare_network(network, pipe.unet, tes)
    if randomise:  # a non-zero delta in every module
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe, network


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet and CLIP-L outputs on fixed inputs: what the network changes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    ids = torch.randint(0, 50, (1, 7), generator=g)
    with torch.no_grad():
        return (pipe.unet(x, torch.tensor([500]), cond, added_cond_kwargs=added).sample,
                pipe.text_encoder(ids).last_hidden_state)


SLOW_ALGOS = ("dora", "diag-oft", "train_norm")  # 3-8 s each on two cores


@pytest.mark.parametrize("algo", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_ALGOS else a for a in ALGOS])
def test_sdxl_file_uses_ks_sai_names_that_ks_and_comfyui_map_and_loads_back(algo, tmp_path):
    from library.tiny_models import build_sdxl

    kwargs = ALGOS[algo]
    pipe = build_sdxl(seed=0)
    base = outputs(pipe)
    pipe, network = sdxl_with_network(kwargs, randomise=True, pipe=pipe)
    before = outputs(pipe)
    assert (before[0] - base[0]).abs().max() > 1e-3 and (before[1] - base[1]).abs().max() > 1e-3  # a real delta
    path = str(tmp_path / "lyco.safetensors")
    network_args.save_network_weights(network, path, None, {"ss_network_module": "lycoris.kohya"})
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["sshs_model_hash"].startswith("0x")  # LyCORIS's hash, as KS's files have
    modules = {k.split(".", 1)[0] for k in tensors}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}

    # every UNet module: an SAI module of the converted checkpoint, of the same shape; the set KS would write
    sai = {"lora_unet_" + p.replace(".", "_"): shape for p, shape in sai_weight_shapes(pipe.unet).items()}
    assert unet_modules <= set(sai), sorted(unet_modules - set(sai))[:5]
    for module in unet_modules:
        size, shape = delta_size(tensors, module), sai[module]
        assert size is None or size == (shape[0], math.prod(shape[1:])), (module, size, shape)
    assert algo not in ("locon", "lokr") or all(delta_size(tensors, m) for m in unet_modules)
    if algo in ("locon", "lokr", "loha"):
        assert unet_modules == ks_lycoris_unet_modules(pipe.unet, conv=True)
    assert any(m.startswith("lora_unet_input_blocks_") for m in unet_modules)
    assert any(m.startswith("lora_unet_middle_block_1_") for m in unet_modules)
    assert any(m.startswith("lora_unet_output_blocks_") for m in unet_modules)
    assert not any(re.search(r"down_blocks|up_blocks|mid_block_|attentions_", m) for m in modules)

    # ComfyUI maps every UNet module to a weight of the loaded model, and every CLIP module
    comfy = comfyui_unet_keys(pipe.unet)
    assert unet_modules <= set(comfy)
    te_modules = modules - unet_modules
    assert te_modules and te_modules <= comfyui_clip_keys(("lora_te1", "lora_te2"))
    assert not any(m.startswith("lora_te1_encoder") for m in modules)

    # --network_weights: a new network gets every tensor and the same delta
    pipe2, network2 = sdxl_with_network(kwargs, randomise=False)
    assert load_weights(network2, path, pipe2.unet) == {}
    own, loaded = network.state_dict(), network2.state_dict()
    assert loaded.keys() == own.keys() and all(torch.equal(loaded[k], own[k]) for k in own)
    after = outputs(pipe2)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])

    # a file from before this change (LyCORIS's names on the diffusers model) still loads
    old = str(tmp_path / "old.safetensors")
    save_file({k: v.contiguous() for k, v in own.items()}, old)
    assert any(k.startswith("lora_unet_down_blocks_") for k in own)
    assert_file_restores(network2, old, pipe2.unet, own)


def test_sd1_unet_names_stay_diffusers_paths_and_clip_gets_text_model(tmp_path):
    """KS's SD1 UNet (library/original_unet.py) uses diffusers module paths: only the CLIP names change."""
    from library.tiny_models import build_sd15

    pipe = build_sd15(seed=0)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, algo="lokr")
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    prepare_network(network, pipe.unet, pipe.text_encoder)
    path = str(tmp_path / "sd1.safetensors")
    network_args.save_network_weights(network, path, None, {})
    modules = {k.split(".", 1)[0] for k in load_file(path)}
    diffusers_paths = {"lora_unet_" + p.replace(".", "_") for p, _ in pipe.unet.named_modules() if p}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    assert unet_modules and unet_modules <= diffusers_paths
    assert unet_modules == {m for m in getattr(network, KS_NAMES_ATTRIBUTE) if m.startswith("lora_unet_")}
    te_modules = modules - unet_modules
    assert te_modules and te_modules <= comfyui_clip_keys(("lora_te",))
    assert load_weights(network, path, pipe.unet) == {}


def test_ks_trained_sdxl_file_with_text_encoder_modules_loads(tmp_path):
    """KS's own SDXL file: SAI UNet names and lora_te1_text_model_ names; no module skipped."""
    pipe, network = sdxl_with_network(ALGOS["loha"], randomise=True)
    path = str(tmp_path / "ks.safetensors")
    network_args.save_network_weights(network, path, None, {})
    assert_file_restores(network, path, pipe.unet, {k: v.clone() for k, v in network.state_dict().items()})


def test_dim_from_weights_builds_every_module_of_a_ks_named_file(tmp_path):
    pipe, network = sdxl_with_network(ALGOS["lokr"], randomise=True)
    path = str(tmp_path / "ks.safetensors")
    network_args.save_network_weights(network, path, None, {})
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    rebuilt, _ = network_args.create_network_from_weights("lycoris.kohya", 1.0, path, None, tes, pipe.unet)
    assert {lora.lora_name for lora in rebuilt.loras} == {k.split(".")[0] for k in network.state_dict()}


def test_sdxl_attn_only_file_names_the_attention_modules_ks_trains(tmp_path):
    """preset=attn-only: KS's LyCORIS trains the Linears of every CrossAttention of its SAI UNet (attn1/attn2 to_q,
    to_k, to_v, to_out.0); our file names exactly those (diffusers calls the class Attention), and only the CLIP
    self-attention projections."""
    from library.tiny_models import build_sdxl
    from networks.lycoris_support import create_network

    pipe = build_sdxl(seed=0)
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    network = create_network(1.0, 4, 2, None, tes, pipe.unet, algo="locon", preset="attn-only")
    network.apply_to(tes, pipe.unet, apply_text_encoder=True, apply_unet=True)
    prepare_network(network, pipe.unet, tes)
    path = str(tmp_path / "attn.safetensors")
    network_args.save_network_weights(network, path, None, {})
    modules = {k.split(".", 1)[0] for k in load_file(path)}
    ks_attention = {"lora_unet_" + p.replace(".", "_") for p in sai_weight_shapes(pipe.unet)
                    if re.search(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p)}
    assert len(ks_attention) == 8 * sum(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules())
    assert {m for m in modules if m.startswith("lora_unet_")} == ks_attention
    te_modules = {m for m in modules if not m.startswith("lora_unet_")}
    assert te_modules and all(re.fullmatch(r"lora_te[12]_text_model_encoder_layers_\d+_self_attn_[qkvout]+_proj", m)
                              for m in te_modules)


def test_sdxl_module_without_an_sai_name_is_refused():
    pipe, network = sdxl_with_network(ALGOS["locon"], randomise=False)
    network.add_module("lora_unet_time_proj_extra", torch.nn.Linear(2, 2))  # no such module in an SAI UNet
    with pytest.raises(UserError, match="lora_unet_time_proj_extra has no SAI-layout name"):
        prepare_network(network, pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])


# ---------------------------------------------------------------------------------------------------------
# end to end: sdxl_train_network.py with lycoris.kohya
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["locon", "lokr"])
def test_sdxl_lycoris_run_writes_ks_names_resumes_bit_exactly_and_reloads(algo, sdxl, dataset, tmp_path):
    from diffusers import UNet2DConditionModel

    from library import checkpointing
    from tests.train_helpers import base_argv, run_inprocess

    items = [f"{k}={v}" for k, v in ALGOS[algo].items()]
    common = dict(network_module="lycoris.kohya", network_args=items, save_every_n_steps=1, save_state=True,
                  train_batch_size=1)
    full = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path / "full"), steps=2, **common))
    state = str(tmp_path / "full" / (checkpointing.step_name("lora", 1) + "-state"))
    resumed = run_inprocess("sdxl", base_argv(sdxl, dataset, str(tmp_path / "resumed"), steps=2,
                                              resume=state, **common))
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is bit-exact

    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    modules = {k.split(".", 1)[0] for k in a}
    assert {m for m in modules if m.startswith("lora_unet_")} == ks_lycoris_unet_modules(unet, conv=True)
    assert {m for m in modules if not m.startswith("lora_unet_")} <= comfyui_clip_keys(("lora_te1", "lora_te2"))
    assert any(m.startswith("lora_te1_text_model_") for m in modules)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k or "lokr_w1" in k)

    # --network_weights (and --dim_from_weights) read the file back into every module: one Adam step at lr 1e-8
    # moves each tensor by about 1e-8, while a tensor left at its initial value would be off by ~1e-3
    for extra in ({}, {"dim_from_weights": True}):
        out = str(tmp_path / f"again{len(extra)}")
        again = run_inprocess("sdxl", base_argv(sdxl, dataset, out, steps=1, network_module="lycoris.kohya",
                                                network_args=items, network_weights=full, learning_rate=1e-8,
                                                train_batch_size=1, **extra))
        c = load_file(again)
        assert c.keys() == a.keys(), extra
        assert max((c[k].float() - a[k].float()).abs().max().item() for k in a) < 1e-6, extra


@pytest.mark.slow
def test_base_weights_merges_a_ks_named_sdxl_lycoris_file(tmp_path):
    """--base_weights with lycoris.kohya: every module of a KS-named file is merged (LyCORIS alone would find
    none of the SAI names on the diffusers UNet)."""
    from types import SimpleNamespace

    from library import ks_run
    from library.tiny_models import build_sdxl

    pipe, network = sdxl_with_network(ALGOS["locon"], randomise=True)
    hooked = outputs(pipe)
    path = str(tmp_path / "base.safetensors")
    network_args.save_network_weights(network, path, None, {})
    fresh = build_sdxl(seed=0)
    base = outputs(fresh)
    args = SimpleNamespace(base_weights=[path], base_weights_multiplier=None, network_module="lycoris.kohya")
    models = SimpleNamespace(text_encoders=[fresh.text_encoder, fresh.text_encoder_2], vae=None, denoiser=fresh.unet)
    ks_run.merge_base_weights(args, models, torch.float32, "cpu")
    merged = outputs(fresh)
    assert (hooked[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(merged[0], hooked[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(merged[1], hooked[1], rtol=0, atol=1e-4)

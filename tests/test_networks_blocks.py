"""Block-wise LoRA (KS block_dims / block_alphas / conv_block_* / *_lr_weight) and --network_args validation.

The expected tables below are written by hand from KS's rules (docs/train_network_README-ja.md "階層別dim",
networks/lora.py get_block_index), for UNets with the full SD1 and SDXL block layouts (tiny channels):
SD1: block = 3·i + j (+1 down, +13 up), samplers 3·i + 2, mid 12. SDXL: input_blocks n -> 1 + n,
middle_block n -> 10 + n, output_blocks n -> 13 + n, on the SAI name of each diffusers module."""
from __future__ import annotations

import math

import pytest
import torch

from library.errors import UserError
from networks import network_args as network_args_lib
from networks.lora import create_network
from networks.lora_options import validate_network_args

SD1_EXPECTED = {
    "down_blocks.0.resnets.0": 1, "down_blocks.0.attentions.0": 1, "down_blocks.0.resnets.1": 2,
    "down_blocks.0.attentions.1": 2, "down_blocks.0.downsamplers.0": 3,
    "down_blocks.1.resnets.0": 4, "down_blocks.1.attentions.0": 4, "down_blocks.1.resnets.1": 5,
    "down_blocks.1.attentions.1": 5, "down_blocks.1.downsamplers.0": 6,
    "down_blocks.2.resnets.0": 7, "down_blocks.2.attentions.0": 7, "down_blocks.2.resnets.1": 8,
    "down_blocks.2.attentions.1": 8, "down_blocks.2.downsamplers.0": 9,
    "down_blocks.3.resnets.0": 10, "down_blocks.3.resnets.1": 11,
    "mid_block": 12,
    "up_blocks.0.resnets.0": 13, "up_blocks.0.resnets.1": 14, "up_blocks.0.resnets.2": 15,
    "up_blocks.0.upsamplers.0": 15,
    "up_blocks.1.resnets.0": 16, "up_blocks.1.attentions.0": 16, "up_blocks.1.resnets.1": 17,
    "up_blocks.1.attentions.1": 17, "up_blocks.1.resnets.2": 18, "up_blocks.1.attentions.2": 18,
    "up_blocks.1.upsamplers.0": 18,
    "up_blocks.2.resnets.0": 19, "up_blocks.2.attentions.0": 19, "up_blocks.2.resnets.1": 20,
    "up_blocks.2.attentions.1": 20, "up_blocks.2.resnets.2": 21, "up_blocks.2.attentions.2": 21,
    "up_blocks.2.upsamplers.0": 21,
    "up_blocks.3.resnets.0": 22, "up_blocks.3.attentions.0": 22, "up_blocks.3.resnets.1": 23,
    "up_blocks.3.attentions.1": 23, "up_blocks.3.resnets.2": 24, "up_blocks.3.attentions.2": 24,
}
# SDXL: diffusers module -> SAI block -> KS index (input_blocks.1,2 = down 0 resnets, .3 = its downsampler, ...)
SDXL_EXPECTED = {
    "down_blocks.0.resnets.0": 2, "down_blocks.0.resnets.1": 3, "down_blocks.0.downsamplers.0": 4,
    "down_blocks.1.resnets.0": 5, "down_blocks.1.attentions.0": 5, "down_blocks.1.resnets.1": 6,
    "down_blocks.1.attentions.1": 6, "down_blocks.1.downsamplers.0": 7,
    "down_blocks.2.resnets.0": 8, "down_blocks.2.attentions.0": 8, "down_blocks.2.resnets.1": 9,
    "down_blocks.2.attentions.1": 9,
    "mid_block.resnets.0": 10, "mid_block.attentions.0": 11, "mid_block.resnets.1": 12,
    "up_blocks.0.resnets.0": 13, "up_blocks.0.attentions.0": 13, "up_blocks.0.resnets.1": 14,
    "up_blocks.0.attentions.1": 14, "up_blocks.0.resnets.2": 15, "up_blocks.0.attentions.2": 15,
    "up_blocks.0.upsamplers.0": 15,
    "up_blocks.1.resnets.0": 16, "up_blocks.1.attentions.0": 16, "up_blocks.1.resnets.1": 17,
    "up_blocks.1.attentions.1": 17, "up_blocks.1.resnets.2": 18, "up_blocks.1.attentions.2": 18,
    "up_blocks.1.upsamplers.0": 18,
    "up_blocks.2.resnets.0": 19, "up_blocks.2.resnets.1": 20, "up_blocks.2.resnets.2": 21,
}


def full_layout_unet(family: str):
    """A UNet with the real SD1 (4 blocks) or SDXL (3 blocks) layout and layers_per_block 2, tiny channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if family == "sd1":
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16,
            attention_head_dim=8)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)


def expected_block(module_path: str, table: dict[str, int]) -> int:
    parts = module_path.split(".")
    for n in (4, 3, 1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    raise AssertionError(f"no expected block for {module_path}")


def as_list(values) -> str:
    return ",".join(str(v) for v in values)


@pytest.mark.parametrize("family, table, n", [("sd1", SD1_EXPECTED, 25), ("sdxl", SDXL_EXPECTED, 23)])
def test_block_dims_and_alphas_land_on_ks_blocks(family, table, n):
    unet = full_layout_unet(family)
    dims = [i + 1 for i in range(n)]                # block i -> rank i + 1
    alphas = [0.5 * (i + 1) for i in range(n)]      # scale 0.5 everywhere
    conv_dims = [i + 30 for i in range(n)]          # distinct from every linear rank
    conv_alphas = [float(i + 30) for i in range(n)]  # scale 1
    network = create_network(1.0, 8, 4, None, None, unet, block_dims=as_list(dims), block_alphas=as_list(alphas),
                             conv_block_dims=as_list(conv_dims), conv_block_alphas=as_list(conv_alphas))
    seen = set()
    for lora in network.unet_loras:
        block = expected_block(lora.module_path, table)
        seen.add(block)
        is_conv3 = isinstance(lora.lora_down, torch.nn.Conv2d) and lora.lora_down.kernel_size != (1, 1)
        if is_conv3:
            assert (lora.lora_dim, lora.scale) == (conv_dims[block], 1.0), lora.lora_name
        else:
            assert (lora.lora_dim, lora.scale) == (dims[block], 0.5), lora.lora_name
    assert seen == set(table.values())  # every block of the layout has modules, and the table covers them all


def test_block_dims_zero_leaves_blocks_out_and_conv_needs_conv_dims():
    unet = full_layout_unet("sd1")
    dims = [4] * 25
    dims[12] = 0  # mid
    network = create_network(1.0, 8, 4, None, None, unet, block_dims=as_list(dims))
    assert network.unet_loras and not any(l.module_path.startswith("mid_block") for l in network.unet_loras)
    # block_dims alone (no conv_block_dims, no conv_dim): KS makes no 3×3 conv modules
    assert not any(l.lora_down.weight.dim() == 4 and l.lora_down.kernel_size != (1, 1) for l in network.unet_loras)
    # conv_dim with block_dims: every block's 3×3 convs get conv_dim (KS)
    network = create_network(1.0, 8, 4, None, None, unet, block_dims=as_list(dims), conv_dim="3")
    convs = [l for l in network.unet_loras if l.lora_down.weight.dim() == 4 and l.lora_down.kernel_size == (3, 3)]
    assert convs and {l.lora_dim for l in convs} == {3}


def test_lr_weights_make_one_group_per_block_and_zero_blocks_have_no_modules():
    unet = full_layout_unet("sd1")
    network = create_network(1.0, 4, 4, None, None, unet, down_lr_weight="0,0,0,0.5,0.5,0.5,1,1,1,1,1,1",
                             mid_lr_weight="2", up_lr_weight="sine", block_lr_zero_threshold="0.05")
    blocks = {expected_block(l.module_path, SD1_EXPECTED) for l in network.unet_loras}
    sine = [math.sin(math.pi * i / 11 / 2) for i in range(12)]  # KS 'sine': 0 at the deep end
    zero_up = {13 + i for i, w in enumerate(sine) if w <= 0.05}
    assert zero_up == {13}
    assert not blocks & ({1, 2, 3} | zero_up)  # weight 0 (or <= threshold): no module
    groups = network.prepare_optimizer_params(None, 1e-3, 1e-4)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for lora in network.unet_loras:
        block = expected_block(lora.module_path, SD1_EXPECTED)
        weight = {4: .5, 5: .5, 6: .5, 12: 2.0}.get(block, 1.0) if block <= 12 else sine[block - 13]
        assert by_param[id(lora.lora_up.weight)] == pytest.approx(1e-3 * weight), lora.lora_name


def test_sdxl_mid_lr_weight_has_three_entries_and_outer_blocks_weight_one():
    options = validate_network_args({"mid_lr_weight": "0,1,0.5", "down_lr_weight": "cosine+.25"}, "sdxl")
    weights = options.block_lr_weight
    assert len(weights) == 23 and weights[0] == weights[22] == 1.0
    assert weights[10:13] == [0.0, 1.0, 0.5]
    assert weights[1:10] == pytest.approx([math.sin(math.pi * i / 8 / 2) + .25 for i in reversed(range(9))])
    assert options.block_dims[10] == 0 and options.block_dims[11] == 4  # zero lr -> no module (KS)


@pytest.mark.parametrize("family, network_args, message", [
    ("sd1", {"block_dims": "4,4"}, "block_dims='4,4' needs 25"),
    ("sdxl", {"block_dims": ",".join(["4"] * 25)}, "needs 23"),
    ("sd1", {"block_alphas": ",".join(["1"] * 25)}, "need block_dims"),
    ("sd1", {"down_lr_weight": "cosin"}, "preset"),
    ("sd1", {"mid_lr_weight": "1,1"}, "mid_lr_weight='1,1' has 2 values"),
    ("sd3", {"block_dims": ",".join(["4"] * 25)}, "no KS block layout"),
    ("sd1", {"train_block_indices": "0-3"}, "SD3"),
    ("sd1", {"block_dim": "4"}, "did you mean 'block_dims'"),
    ("sd1", {"dropout": "0.1"}, "--network_dropout"),
    ("sd1", {"algo": "lokr"}, "lycoris.kohya"),
    ("sd1", {"exclude_patterns": "['(']"}, "regular expression"),
    ("sd1", {"dora_wd": "maybe"}, "True or False"),
    ("sd1", {"dora_wd": "True", "rank_dropout": "0.1"}, "rank_dropout"),
    ("sd3", {"dora_wd": "True"}, "lycoris"),
])
def test_network_args_mistakes_are_named(family, network_args, message):
    with pytest.raises(UserError, match="--network_args") as err:
        validate_network_args(network_args, family)
    assert message in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (dict(network_dim=0), "--network_dim"), (dict(network_dim=-4), "--network_dim"),
    (dict(network_alpha=-1.0), "--network_alpha"), (dict(network_dropout=1.0), "--network_dropout"),
    (dict(scale_weight_norms=0.0), "--scale_weight_norms"),
])
def test_flag_mistakes_are_named(flags, message):
    with pytest.raises(UserError, match=message):
        network_args_lib.validate("networks.lora", [], "sd1", **flags)


def test_trainer_refuses_bad_network_args_before_loading_the_model(tmp_path):
    """The model path does not exist: the network_args error must come first (nothing loaded)."""
    from library import train_util
    from library.families import get_adapter
    from library.training_loop import validate

    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--network_args", "block_dims=4,4,4"]
    args = train_util.parse_args("sdxl", argv)
    with pytest.raises(UserError, match="block_dims='4,4,4' needs 23"):
        validate(args, get_adapter("sdxl"))
    args = train_util.parse_args("sd1", argv[:-2] + ["--network_args", "conv_dimm=4"])
    with pytest.raises(UserError, match="did you mean 'conv_dim'"):
        validate(args, get_adapter("sd1"))


def test_exclude_and_include_patterns_select_modules():
    from library.tiny_models import build_sd15

    pipe = build_sd15(seed=0)
    everything = create_network(1.0, 4, 1, None, pipe.text_encoder, pipe.unet)
    network = create_network(1.0, 4, 1, None, pipe.text_encoder, pipe.unet,
                             exclude_patterns=r"['.*attn2.*', 'lora_te_.*']", include_patterns=r"['.*attn2\.to_k']")
    names = {l.lora_name for l in network.text_encoder_loras + network.unet_loras}
    all_names = {l.lora_name for l in everything.text_encoder_loras + everything.unet_loras}
    expected = {n for n in all_names if "attn2" not in n and not n.startswith("lora_te_")} | \
               {n for n in all_names if n.endswith("attn2_to_k")}
    assert names == expected and any(n.endswith("attn2_to_k") for n in names)


def test_sd3_train_block_indices_keep_only_selected_transformer_blocks():
    from library.tiny_models import build_sd3

    pipe = build_sd3(seed=0, with_t5=False)
    network = create_network(1.0, 4, 1, None, [pipe.text_encoder, pipe.text_encoder_2, None], pipe.transformer,
                             train_block_indices="1")
    blocks = {int(l.module_path.split(".")[1]) for l in network.unet_loras}
    assert blocks == {1} and network.text_encoder_loras

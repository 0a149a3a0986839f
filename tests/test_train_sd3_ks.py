"""sd3_train_network.py at KS parity, end to end on tiny models: networks.lora_sd3 on SD3.5 medium (MMDiT-X) and
large; KS's SD3 recipe (docs/sd3_train_network.md) with separate --clip_l/--clip_g/--t5xxl files; a KS file back in
with --network_weights."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.sd3_convert import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX
from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_images(str(root / "2_sks photo"), 2, size=(64, 64))
    return str(root)


@pytest.mark.parametrize("variant", ["sd35_medium", "sd35_large"])
def test_sd35_tiny_models_train_with_networks_lora_sd3(variant, dataset, tmp_path, capsys):
    from library.tiny_models import build_sd35

    model = str(tmp_path / variant)
    build_sd35(variant, seed=0, with_t5=False).save_pretrained(model)
    path = run_inprocess("sd3", base_argv(model, dataset, str(tmp_path / "out"), steps=2, t5xxl_max_token_length=16,
                                          network_module="networks.lora_sd3", lora_format="kohya",
                                          network_args=["emb_dims=[4,0,0,4,0,4]"]))
    sd = lora_tensors(path)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in sd
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].abs().sum() > 0   # it trained
    assert "lora_unet_context_embedder.lora_down.weight" in sd and "lora_unet_final_layer_linear.alpha" in sd
    assert ("lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in sd) == (variant == "sd35_medium")
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
    with safe_open(path, framework="pt") as f:
        kind = "5-medium" if variant == "sd35_medium" else "5-large"
        assert f.metadata()["modelspec.architecture"] == f"stable-diffusion-3-{kind}/lora"

    # the file goes back in with --network_weights: no unmatched key (the trainer prints the load info)
    again = run_inprocess("sd3", base_argv(model, dataset, str(tmp_path / "again"), steps=1,
                                           t5xxl_max_token_length=16, network_module="networks.lora_sd3",
                                           lora_format="kohya", network_args=["emb_dims=[4,0,0,4,0,4]"],
                                           network_weights=path))
    assert set(lora_tensors(again)) == set(sd)
    out = capsys.readouterr().out
    assert "<All keys matched successfully>" in out, [l for l in out.splitlines() if "loaded" in l]


@pytest.fixture(scope="module")
def ks_files(tmp_path_factory):
    """KS's SD3 inputs: an MMDiT+VAE single file (as sd3_medium.safetensors) and clip_l / clip_g / t5xxl files."""
    from tests.fixtures.tiny_sd3 import write_tiny_sd3

    root = tmp_path_factory.mktemp("ks_sd3")
    tiny = write_tiny_sd3(str(root))
    full = load_file(tiny.single_file)
    files = {"model": str(root / "sd3_medium.safetensors"), "clip_l": str(root / "clip_l.safetensors"),
             "clip_g": str(root / "clip_g.safetensors"), "t5xxl": str(root / "t5xxl_fp16.safetensors")}
    save_file({k: v for k, v in full.items() if not k.startswith("text_encoders.")}, files["model"])
    for name, prefix in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX), ("t5xxl", T5_PREFIX)):
        save_file({k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}, files[name])
    files["config"] = tiny.config_dir
    return files


def test_ks_sd3_recipe_trains(ks_files, dataset, tmp_path):
    """KS docs/sd3_train_network.md's command with the SD3 options the issue names (networks.lora_sd3,
    weighting_scheme, training_shift, blocks_to_swap, apply_t5_attn_mask, cached text-encoder outputs). Changed:
    the paths; --model_config (a tiny model is not SD3-medium-shaped); --mixed_precision fp16 -> no and
    AdamW8bit -> AdamW (CPU: fp16 autocast and bitsandbytes need a GPU); 1 epoch, 64 px."""
    toml = tmp_path / "my_sd3_dataset_config.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 1\n'
                    f'[[datasets.subsets]]\nimage_dir = "{os.path.join(dataset, "2_sks photo")}"\nnum_repeats = 1\n')
    out = tmp_path / "out"
    argv = [
        f"--pretrained_model_name_or_path={ks_files['model']}",
        f"--clip_l={ks_files['clip_l']}",
        f"--clip_g={ks_files['clip_g']}",
        f"--t5xxl={ks_files['t5xxl']}",
        f"--dataset_config={toml}",
        f"--output_dir={out}",
        "--output_name=my_sd3_lora",
        "--save_model_as=safetensors",
        "--network_module=networks.lora_sd3",
        "--network_dim=16",
        "--network_alpha=1",
        "--learning_rate=1e-4",
        "--optimizer_type=AdamW",
        "--lr_scheduler=constant",
        "--sdpa",
        "--max_train_epochs=1",
        "--save_every_n_epochs=1",
        "--mixed_precision=no",
        "--gradient_checkpointing",
        "--weighting_scheme=logit_normal",
        "--training_shift=3.0",
        "--blocks_to_swap=32",
        "--apply_t5_attn_mask",
        "--cache_text_encoder_outputs",
        "--network_train_unet_only",
        "--t5xxl_max_token_length=16",
        f"--model_config={ks_files['config']}",
    ]
    path = run_inprocess("sd3", argv)
    sd = lora_tensors(path)
    assert os.path.basename(path) == "my_sd3_lora.safetensors"
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd   # default --lora_format peft
    assert all(torch.isfinite(v).all() for v in sd.values())
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_apply_t5_attn_mask"] == "True" and metadata["ss_weighting_scheme"] == "logit_normal"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-medium/lora"

"""KS run-time behaviours (library/ks_run.py, library/checkpointing.py names): --base_weights merged into the frozen
model, --save_n_epoch_ratio, KS's pruning of step/epoch saves and state folders, tracker config, workers, names."""
import os
import types

import pytest
import torch

from library import checkpointing, ks_run, train_util
from library.errors import UserError


def test_ks_file_and_state_names():
    assert checkpointing.step_name("lora", 100) == "lora-step00000100"
    assert checkpointing.epoch_name("lora", 1) == "lora-000001"
    assert checkpointing.last_name("lora") == "lora"
    # KS defaults without --output_name (train_util DEFAULT_STEP_NAME / DEFAULT_EPOCH_NAME / DEFAULT_LAST_OUTPUT_NAME)
    assert (checkpointing.step_name(None, 5), checkpointing.epoch_name(None, 2), checkpointing.last_name(None)) == (
        "at-step00000005", "epoch-000002", "last")


def _touch(folder, names):
    for name in names:
        if name.endswith("-state"):
            os.makedirs(folder / name)
        else:
            (folder / name).write_bytes(b"x")


def test_pruning_as_ks_with_separate_state_counts(tmp_path):
    """every=10, last_n=30 (KS's own example): at step 50 the save at step 10 goes, 20..50 stay. States follow
    --save_last_n_steps_state (here 10: only 40 and 50 stay)."""
    names = [checkpointing.step_name("x", s) + ext for s in (10, 20, 30, 40, 50) for ext in (".safetensors", "-state")]
    _touch(tmp_path, names + ["x-000001.safetensors", "other-step00000010.safetensors"])
    checkpointing.remove_old_saves(str(tmp_path), "x", 30, 50, "step", 10, what="files")
    checkpointing.remove_old_saves(str(tmp_path), "x", 10, 50, "step", 10, what="states")
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(["x-step00000020.safetensors", "x-step00000030.safetensors", "x-step00000040.safetensors",
                           "x-step00000050.safetensors", "x-step00000040-state", "x-step00000050-state",
                           "x-000001.safetensors", "other-step00000010.safetensors"])
    # epochs: every 2, keep the last 2 saves: at epoch 8 the saves up to epoch 4 go
    _touch(tmp_path, [checkpointing.epoch_name(None, e) + ".safetensors" for e in (2, 4, 6, 8)])
    checkpointing.remove_old_saves(str(tmp_path), None, 2, 8, "epoch", 2, what="files")
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("epoch-")) == ["epoch-000006.safetensors",
                                                                               "epoch-000008.safetensors"]


def test_save_n_epoch_ratio_and_workers():
    args = types.SimpleNamespace(save_n_epoch_ratio=3, save_every_n_epochs=None)
    assert ks_run.save_every_n_epochs(args, 10) == 3          # KS: floor(10 / 3)
    assert ks_run.save_every_n_epochs(args, 2) == 1           # at least every epoch
    args.save_n_epoch_ratio, args.save_every_n_epochs = None, 4
    assert ks_run.save_every_n_epochs(args, 10) == 4
    assert ks_run.data_loader_workers(8, latents_cached=False) == min(8, os.cpu_count())
    assert ks_run.data_loader_workers(8, latents_cached=True) == 0


def test_tracker_config_leaves_out_keys_and_paths(tmp_path):
    args = train_util.parse_args("sd1", ["--pretrained_model_name_or_path", "/home/me/model", "--output_dir",
                                         "/home/me/out", "--wandb_api_key", "secret", "--log_config",
                                         "--wandb_run_name", "run1", "--network_args", "conv_dim=4"])
    config = ks_run.tracker_config(args)
    assert "wandb_api_key" not in config and "pretrained_model_name_or_path" not in config
    assert "output_dir" not in config and config["network_args"] == "['conv_dim=4']"
    assert "secret" not in str(config) and "/home/me" not in str(config)
    args.log_config = False
    assert ks_run.tracker_config(args) is None
    tracker_toml = tmp_path / "trackers.toml"
    tracker_toml.write_text('[wandb]\nentity = "team"\ntags = ["a"]\n', encoding="utf-8")
    args.log_tracker_config = str(tracker_toml)
    assert ks_run.tracker_init_kwargs(args) == {"wandb": {"entity": "team", "tags": ["a"], "name": "run1"}}


def test_base_weights_flags_are_checked(tmp_path):
    args = train_util.parse_args("sd1", ["--base_weights", str(tmp_path / "missing.safetensors")])
    with pytest.raises(UserError, match="--base_weights: .* does not exist"):
        ks_run.check(args)
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    args = train_util.parse_args("sd1", ["--base_weights", str(lora), "--base_weights_multiplier", "1", "0.5"])
    with pytest.raises(UserError, match="2 values for 1"):
        ks_run.check(args)


def test_base_weights_are_merged_into_the_frozen_model(tmp_path):
    """W' = W + m · (alpha/rank) · up·down for every module of the file (KS merge_to), here with m = 0.5."""
    from library.tiny_models import build_sd15
    from networks import lora as lora_module

    pipe = build_sd15(seed=0)
    torch.manual_seed(0)
    network = lora_module.create_network(1.0, 4, 2.0, pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.05)  # up weights start at zero: give the file a real delta
    path = str(tmp_path / "base.safetensors")
    network.save_weights(path, torch.float32, {})
    module = network.unet_loras[0]
    expected_delta = module.delta_weight() * 0.5
    network.restore()

    fresh = build_sd15(seed=0)
    before = {n: p.detach().clone() for n, p in fresh.unet.named_parameters()}
    args = types.SimpleNamespace(base_weights=[path], base_weights_multiplier=[0.5], network_module="networks.lora")
    models = types.SimpleNamespace(text_encoders=[fresh.text_encoder], vae=fresh.vae, denoiser=fresh.unet)
    ks_run.merge_base_weights(args, models, torch.float32, "cpu")
    changed = {n: p.detach() - before[n] for n, p in fresh.unet.named_parameters()
               if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing was merged"
    assert any(d.shape == expected_delta.shape and torch.allclose(d, expected_delta, atol=1e-6)
               for d in changed.values())
    assert all(not hasattr(m, "lora_up") for m in fresh.unet.modules())  # merged, not hooked

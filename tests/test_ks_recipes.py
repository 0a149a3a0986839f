"""KS recipes run here unchanged except for paths: a typical SD1.5 LoRA TOML from KS's docs, and the TOML of every
KS flag at its KS default (what an old KS `--output_config` wrote), on a tiny model."""
import json
import os

import pytest
import toml
from safetensors import safe_open

from library import ks_compat
from tests.test_ks_compat import PENDING
from tests.train_helpers import make_images, run_inprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_images(str(root / "3_sks dog"), 2, caption="sks dog, red collar, on grass, photo")
    return str(root)


def _metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


# KS docs/train_network.md style SD1.5 recipe (sections only group keys, as KS); only paths and the size of
# the run differ from what a user would write for a real model.
SD15_RECIPE = """
[model_arguments]
pretrained_model_name_or_path = "{model}"
v2 = false

[dataset_arguments]
train_data_dir = "{data}"
resolution = "64,64"
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
caption_dropout_rate = 0.05
caption_tag_dropout_rate = 0.1
cache_latents = true

[training_arguments]
output_dir = "{out}"
output_name = "sks_dog"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_steps = 2
train_batch_size = 1
max_train_steps = 3
max_token_length = 225
clip_skip = 2
mixed_precision = "no"
seed = 42
gradient_checkpointing = true
noise_offset = 0.0357
min_snr_gamma = 5.0
sample_prompts = "{prompts}"
sample_every_n_steps = 3
sample_sampler = "euler_a"
sample_at_first = true
training_comment = "KS recipe"
metadata_author = "tester"

[network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=2"]

[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)"]
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 5e-5
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 2
lr_warmup_steps = 0.1
max_grad_norm = 1.0
"""


@pytest.mark.slow
def test_sd15_ks_recipe_trains_unchanged(sd15, data, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog on a beach --n blurry --w 64 --h 64 --s 2 --l 6.5 --d 3\n", encoding="utf-8")
    config = tmp_path / "recipe.toml"
    config.write_text(SD15_RECIPE.format(model=sd15, data=data, out=tmp_path / "out", prompts=prompts),
                      encoding="utf-8")
    final = run_inprocess("sd1", ["--config_file", str(config)])
    out = tmp_path / "out"
    files = sorted(os.listdir(out))
    assert "sks_dog.safetensors" in files and "sks_dog-step00000002.safetensors" in files
    samples = sorted(os.listdir(out / "sample"))
    assert [s[len("sks_dog_"):].split("_")[0] for s in samples] == ["000000", "000003"]  # at first, then step 3
    md = _metadata(final)
    assert md["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01,betas=(0.9, 0.99))"
    assert md["ss_lr_scheduler"] == "cosine_with_restarts" and md["ss_clip_skip"] == "2"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert md["ss_min_snr_gamma"] == "5.0" and md["ss_noise_offset"] == "0.0357" and md["ss_seed"] == "42"
    assert md["ss_training_comment"] == "KS recipe" and md["modelspec.author"] == "tester"
    assert md["ss_resolution"] == "(64, 64)" and md["modelspec.title"] == "sks_dog"
    with safe_open(final, "pt") as f:
        keys = list(f.keys())
    assert any("conv" in k or "_resnets_" in k for k in keys if k.endswith("lora_down.weight"))
    assert "note:" not in capsys.readouterr().out  # nothing in the recipe is ignored


def _all_defaults_toml(script: str) -> dict:
    """Every KS flag of the script at KS's default (TOML cannot hold None: those are left out, as KS does)."""
    out = {}
    for entry in ks_compat.ks_flags()[script]:
        name = entry["flags"][0].lstrip("-")
        if name in PENDING or name in ("config_file", "output_config") or entry["default"] is None:
            continue
        out[name] = entry["default"]
    return out


@pytest.mark.slow
def test_ks_all_defaults_config_trains_unchanged_except_paths(sd15, data, tmp_path, capsys):
    config = _all_defaults_toml("train_network.py")
    assert len(config) > 75  # every KS flag with a non-None default (and not pending)
    # paths, and the size of the run (KS's 1600 steps and no resolution do not fit a CPU test)
    config.update(pretrained_model_name_or_path=sd15, train_data_dir=data, output_dir=str(tmp_path / "out"),
                  max_train_steps=1, resolution="64")
    path = tmp_path / "ks_defaults.toml"
    path.write_text(toml.dumps(config), encoding="utf-8")
    final = run_inprocess("sd1", ["--config_file", str(path)])
    assert os.path.basename(final) == "last.safetensors"  # KS's name without --output_name
    md = _metadata(final)
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW" and md["ss_learning_rate"] == "2e-06"
    assert md["ss_epoch"] == "1" and md["ss_steps"] == "1"
    out = capsys.readouterr().out
    assert "note:" not in out  # KS defaults are never "set"

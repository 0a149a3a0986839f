"""A typical KS SDXL LoRA recipe (KS docs: Adafactor with fixed lr, bf16 with --full_bf16 and --fp8_base, cached
text-encoder outputs, U-Net only, --clip_skip which SDXL ignores) runs here unchanged except for paths and size."""
import os

import pytest
from safetensors import safe_open

from tests.train_helpers import make_images, run_inprocess

SDXL_RECIPE = """
[model_arguments]
pretrained_model_name_or_path = "{model}"
no_half_vae = true

[dataset_arguments]
train_data_dir = "{data}"
resolution = "64,64"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_no_upscale = true
caption_extension = ".txt"
cache_latents = true
cache_text_encoder_outputs = true

[training_arguments]
output_dir = "{out}"
output_name = "sdxl_lora"
save_model_as = "safetensors"
save_precision = "bf16"
train_batch_size = 1
max_train_steps = 2
mixed_precision = "bf16"
full_bf16 = true
fp8_base = true
gradient_checkpointing = true
clip_skip = 2
seed = 1
sdpa = true

[network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "Adafactor"
optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
learning_rate = 1e-4
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1
max_grad_norm = 0.0
"""


@pytest.mark.slow
def test_sdxl_ks_recipe_trains_unchanged(tmp_path, capsys):
    from tests.fixtures.tiny_sdxl import write_tiny_sdxl

    model = write_tiny_sdxl(str(tmp_path / "sdxl")).diffusers_dir
    make_images(str(tmp_path / "data" / "2_sks photo"), 2, size=(64, 64))
    config = tmp_path / "sdxl.toml"
    config.write_text(SDXL_RECIPE.format(model=model, data=tmp_path / "data", out=tmp_path / "out"), encoding="utf-8")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # bf16: other tests of this process set up accelerate without it
    try:
        final = run_inprocess("sdxl", ["--config_file", str(config)])
    finally:
        AcceleratorState._reset_state(True)
    assert os.path.basename(final) == "sdxl_lora.safetensors"
    with safe_open(final, "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["ss_optimizer"] == ("transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,"
                                  "warmup_init=False)")  # KS: the arguments in the order given
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_fp8_base"] == "True"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(k.startswith("lora_unet_") for k in keys)  # U-Net only
    out = capsys.readouterr().out
    # the two flags that change nothing here say so, once; nothing else is noted
    assert out.count("note: --clip_skip has no effect here") == 1 and out.count("note: --sdpa") == 1
    assert out.count("note:") == out.count("note: --clip_skip") + out.count("note: --sdpa") + out.count("note: --no_half_vae")

"""Sample images: KS prompt files (.txt, .toml, .json), KS sampler names, PNGs named as KS for sd1 / sdxl / sd3,
and sampling that leaves the RNG and the train/eval modes as it found them."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.families import get_adapter
from library.families.base import ModelOptions
from library.families.sd1 import SD1Options
from library.families.sd3 import SD3Options
from library.sampling import (SAMPLER_NAMES, PromptSpec, generate_samples, make_sample_scheduler, parse_prompt_file,
                              sample_file_name, sample_label)
from tests.train_helpers import save_tiny_sd15

KS_PROMPTS = """# prompts for sample images (KS format)
a photo of sks dog --n low quality, blurry --w 576 --h 832 --d 42 --l 5.5 --s 28

   # an indented comment
sks cat on a sofa
masterpiece, sks --CFG 6 --ss euler_a --g 0.7 --s 5000
"""


# ------------------------------------------------------------------------------------------------------------ prompts
def test_parse_ks_text_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(KS_PROMPTS, encoding="utf-8")
    dog, cat, master = parse_prompt_file(str(path))
    assert dog == PromptSpec(prompt="a photo of sks dog", negative_prompt="low quality, blurry", width=576,
                             height=832, sample_steps=28, scale=5.5, seed=42, index=0)
    assert cat == PromptSpec(prompt="sks cat on a sofa", index=1)  # KS defaults: 512², 30 steps, CFG 7.5, no seed
    # KS --g is the (Flux) guidance scale, not guidance rescale (ours: --gr / --cfgr)
    assert (master.prompt, master.scale, master.sample_sampler, master.guidance_scale, master.guidance_rescale) == (
        "masterpiece, sks", 6.0, "euler_a", 0.7, None)
    assert master.sample_steps == 1000 and master.index == 2  # KS clamps steps to [1, 1000]


@pytest.mark.parametrize("line, message", [
    ("a cat --q 3", "line 1: unknown option --q"),
    ("a cat --wh 3", "did you mean --w"),
    ("a cat --w wide", "--w needs an integer, got 'wide'"),
    ("a cat --l high", "--l needs a number"),
    ("a cat --cn control.png", "--cn (ControlNet image) is not used"),
])
def test_unknown_prompt_options_warn_and_are_skipped_as_ks(tmp_path, capsys, line, message):
    """KS skips what it cannot read; we do too, but say so (one warning naming the file and line)."""
    path = tmp_path / "p.txt"
    path.write_text(line + " --gr 0.5", encoding="utf-8")
    (spec,) = parse_prompt_file(str(path))
    assert spec.prompt == "a cat" and (spec.width, spec.scale) == (512, 7.5) and spec.guidance_rescale == 0.5
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and message in out and "line 1" in out


def test_empty_prompt_is_an_error(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("--w 512", encoding="utf-8")
    with pytest.raises(UserError, match="line 1: the prompt is empty"):
        parse_prompt_file(str(path))


def test_parse_ks_toml_and_json_prompt_files(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nnegative_prompt = "bad"\nsample_steps = 20\nwidth = 640\n\n'
                    '[[prompt.subset]]\nprompt = "one"\nseed = 7\n\n[[prompt.subset]]\nprompt = "two"\nwidth = 768\n',
                    encoding="utf-8")
    one, two = parse_prompt_file(str(toml))
    assert (one.prompt, one.negative_prompt, one.sample_steps, one.width, one.seed) == ("one", "bad", 20, 640, 7)
    assert (two.prompt, two.width, two.index) == ("two", 768, 1)
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["line prompt --d 3", {"prompt": "dict prompt", "scale": 4}]), encoding="utf-8")
    line, entry = parse_prompt_file(str(js))
    assert (line.prompt, line.seed, entry.prompt, entry.scale) == ("line prompt", 3, "dict prompt", 4)
    js.write_text(json.dumps([{"prompt": "x", "negative": "y"}]), encoding="utf-8")
    (entry,) = parse_prompt_file(str(js))
    assert entry.negative_prompt is None
    with pytest.raises(UserError, match="does not exist"):
        parse_prompt_file(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        parse_prompt_file(str(tmp_path / "empty.txt"))


# ------------------------------------------------------------------------------------------------------------ schedulers
SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1}


@pytest.mark.parametrize("name, class_name", [
    ("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"), ("lms", "LMSDiscreteScheduler"),
    ("k_lms", "LMSDiscreteScheduler"), ("euler", "EulerDiscreteScheduler"), ("k_euler", "EulerDiscreteScheduler"),
    ("euler_a", "EulerAncestralDiscreteScheduler"), ("k_euler_a", "EulerAncestralDiscreteScheduler"),
    ("heun", "HeunDiscreteScheduler"), ("dpm_2", "KDPM2DiscreteScheduler"), ("k_dpm_2", "KDPM2DiscreteScheduler"),
    ("dpm_2_a", "KDPM2AncestralDiscreteScheduler"), ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler"),
    ("dpmsolver", "DPMSolverMultistepScheduler"), ("dpmsolver++", "DPMSolverMultistepScheduler"),
    ("dpmsingle", "DPMSolverSinglestepScheduler")])
def test_ks_sampler_names_map_to_diffusers_schedulers_keeping_the_model_config(name, class_name):
    scheduler = make_sample_scheduler(name, SD_CONFIG)
    assert type(scheduler).__name__ == class_name
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_end == 0.012
    if name.startswith("dpmsolver"):
        assert scheduler.config.algorithm_type == name


def test_flow_models_always_sample_with_flow_euler_and_unknown_names_fail():
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for name in ("ddim", "euler", "dpmsolver++"):
        scheduler = make_sample_scheduler(name, config, flow=True)
        assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 3.0
    with pytest.raises(UserError, match="did you mean 'euler_a'"):
        make_sample_scheduler("eulera", SD_CONFIG)
    assert len(SAMPLER_NAMES) == 16


def test_ks_file_names():
    assert sample_label(step=120) == "000120" and sample_label(epoch=3) == "e000003"
    assert sample_file_name("lora", "000120", 2, "20240101120000", 42) == "lora_000120_02_20240101120000_42.png"
    assert sample_file_name(None, "e000003", 0, "20240101120000", 7) == "e000003_00_20240101120000_7.png"


# ------------------------------------------------------------------------------------------------------------ images
def check_generation(adapter, models, tmp_path, size=64):
    prompts = [PromptSpec("sks photo", width=size, height=size, sample_steps=2, index=0),
               PromptSpec("a red square", negative_prompt="blue", width=size + 63, height=size, sample_steps=2,
                          scale=3.0, seed=11, index=1)]
    models.denoiser.train()  # as during training with gradient checkpointing: must come back in train mode
    rng_state = torch.get_rng_state()
    paths = generate_samples(adapter, models, prompts, str(tmp_path), sample_label(step=5), "euler_a", seed=100,
                             output_name="lora", timestamp="20240101000000")
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        os.path.join("sample", "lora_000005_00_20240101000000_100.png"),
        os.path.join("sample", "lora_000005_01_20240101000000_11.png")]
    assert torch.equal(rng_state, torch.get_rng_state())
    assert models.denoiser.training and all(m.training for m in models.denoiser.modules())
    assert not models.text_encoders[0].training
    images = [np.asarray(Image.open(p)) for p in paths]
    assert images[0].shape == (size, size, 3) and images[1].shape == (size, size, 3)  # width 127 -> 64 (KS)
    again = generate_samples(adapter, models, prompts[:1], str(tmp_path / "again"), "000005", "euler_a", seed=100,
                             timestamp="20240101000000")
    assert np.array_equal(np.asarray(Image.open(again[0])), images[0])  # same seed, same image
    models.denoiser.eval()
    return images


def test_generate_samples_sd1(tmp_path_factory, tmp_path):
    model = save_tiny_sd15(str(tmp_path_factory.mktemp("sampling") / "sd15"))
    adapter = get_adapter("sd1")
    models = adapter.load(SD1Options(model))
    images = check_generation(adapter, models, tmp_path)
    assert not np.array_equal(images[0], images[1])  # different prompt and seed, different image


def test_generate_samples_sdxl(tmp_path):
    from library.tiny_models import build_sdxl

    pipe = build_sdxl(0)
    pipe.save_pretrained(str(tmp_path / "sdxl"))
    adapter = get_adapter("sdxl")
    check_generation(adapter, adapter.load(ModelOptions(str(tmp_path / "sdxl"))), tmp_path / "out")


def test_generate_samples_sd3(tmp_path):
    from library.tiny_models import build_sd3

    build_sd3(0, with_t5=False).save_pretrained(str(tmp_path / "sd3"))
    adapter = get_adapter("sd3")
    check_generation(adapter, adapter.load(SD3Options(str(tmp_path / "sd3"))), tmp_path / "out")

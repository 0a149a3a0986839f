"""The trainer logs what issue 7 promises: KS loss tags, the normalised and per-band losses, a fixed validation
loss, the timestep histogram and heatmap in tensorboard, sample images under output_dir/sample, and the curves'
state is saved with --save_state."""
import glob
import os

import pytest

from tests.train_helpers import base_argv, make_images, run_inprocess, save_tiny_sd15


@pytest.mark.slow
def test_tensorboard_tags_validation_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = save_tiny_sd15(str(tmp_path / "model"))
    make_images(str(tmp_path / "data" / "2_sks photo"), 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks photo --w 64 --h 64 --s 2 --d 5\n# a comment\na cat --n blurry --s 2 --l 5\n")
    out = tmp_path / "out"
    run_inprocess("sd1", base_argv(model, str(tmp_path / "data"), str(out), steps=8, validation_split=0.5,
                                   validate_every_n_steps=4, logging_dir=str(tmp_path / "logs"),
                                   heatmap_every_n_steps=2, sample_prompts=str(prompts), sample_every_n_steps=4,
                                   save_state=True))
    events = [f for f in glob.glob(str(tmp_path / "logs" / "**" / "events*"), recursive=True)]
    tags = {"scalars": set(), "images": set(), "histograms": set()}
    scalars = {}
    for f in events:
        acc = EventAccumulator(f, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
    for tag in ("loss/current", "loss/average", "loss/normalized", "loss/validation", "loss/validation_weighted",
                "loss/validation/bin_00", "loss/validation/bin_09", "lr/group0"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("loss/timestep_bin/") for t in tags["scalars"])
    assert "loss/timestep_heatmap" in tags["images"] and "timesteps/sampled" in tags["histograms"]
    assert len(scalars["loss/validation"]) == 2 and len(scalars["loss/current"]) == 8
    assert all(0.2 < v < 5 for v in scalars["loss/normalized"])
    samples = sorted(os.listdir(out / "sample"))
    assert len(samples) == 4 and samples[0].startswith("lora_000004_00_") and samples[0].endswith("_5.png")
    assert os.path.isfile(out / "lora-state" / "metrics.pt")


def test_bad_prompt_file_fails_before_models_load(tmp_path):
    from library.errors import UserError

    make_images(str(tmp_path / "data" / "1_x"), 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("--s 20\n")  # an empty prompt (a bad option value only warns, as KS skips it)
    with pytest.raises(UserError, match="prompts.txt"):
        run_inprocess("sd1", base_argv(str(tmp_path / "no_model_needed"), str(tmp_path / "data"), str(tmp_path),
                                       sample_prompts=str(prompts)))

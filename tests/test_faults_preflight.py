"""Issue 13: what is checked before any model loads, each mistake one line and exit 2.

#1 output and logging folders writable with room, #3 --output_config never overwrites, #5 existing LoRA and bad
--output_name refused, #6/#7 the family (SD1/SD2/SDXL/SD3/Flux/Chroma, v-prediction) of folders and single files
(tiny Flux and Chroma models: tests/test_faults_family_flux.py), #8 numbers
that cannot work, #10 a bad --network_weights, #12 an unknown flag names the closest one."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from library import preflight, train_util
from library.checkpointing import TrainState
from library.errors import UserError
from tests.fixtures.tiny import tiny_sd1_paths

SCRIPTS = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py", "sd3": "sd3_train_network.py",
           "flux": "flux_train_network.py", "chroma": "chroma_train_network.py"}


class Validated(Exception):
    """Raised where the data scan would start: validation passed, and nothing was loaded before."""


def run(family, argv, monkeypatch, capsys):
    """run_cli of the trainer, stopped right after validation. Returns (exit code, stderr)."""
    import library.data
    from library.families import get_adapter
    from library.training_loop import train

    def scan(*a, **k):
        raise Validated
    monkeypatch.setattr(library.data, "build_dataset_group", scan)
    capsys.readouterr()
    try:
        code = train_util.run_cli(lambda args: train(args, get_adapter(family)), family, argv)
    except Validated:
        code = "validated"
    return code, capsys.readouterr().err


def argv_for(tmp_path, model=None, **extra):
    data = tmp_path / "data"
    (data / "1_x").mkdir(parents=True, exist_ok=True)
    argv = ["--pretrained_model_name_or_path", model or tiny_sd1_paths()["diffusers"], "--train_data_dir", str(data),
            "--output_dir", str(tmp_path / "out"), "--output_name", "lora"]
    for key, value in extra.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    return argv


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- #1 output folders ------------------------------------------------------------------------------------------
def test_unwritable_or_full_output_folders_fail_before_load(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = argv_for(tmp_path)
    argv[argv.index("--output_dir") + 1] = str(blocker / "out")
    one_line_error(*run("sd1", argv, monkeypatch, capsys), "--output_dir", "cannot create")
    one_line_error(*run("sd1", argv_for(tmp_path, logging_dir=str(blocker / "logs")), monkeypatch, capsys),
                   "--logging_dir")
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 48 * 1024)
    one_line_error(*run("sd1", argv_for(tmp_path), monkeypatch, capsys), "--output_dir", "0.0 MiB free")


def test_room_for_saves_is_checked_once_the_network_size_is_known(tmp_path, monkeypatch):
    network = torch.nn.Linear(1000, 1000)  # 1M parameters: 2 MB in fp16, +12 MB of state
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 8 * 2**20)
    preflight.check_room_for_saves(str(tmp_path), network, torch.float16, save_state=False)
    with pytest.raises(UserError, match="a save needs about"):
        preflight.check_room_for_saves(str(tmp_path), network, torch.float16, save_state=True)


# ---- #5 output names and existing files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "sub/x", "/abs/x", "", "  ", ".hidden", "..", "a\\b"])
def test_output_names_outside_the_folder_or_hidden_are_refused(tmp_path, monkeypatch, capsys, name):
    argv = argv_for(tmp_path)
    argv[argv.index("--output_name") + 1] = name
    one_line_error(*run("sd1", argv, monkeypatch, capsys), "--output_name")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists("/abs")


def test_existing_lora_is_not_overwritten_without_the_flag(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"previous run")
    line = one_line_error(*run("sd1", argv_for(tmp_path), monkeypatch, capsys), "lora.safetensors", "--overwrite")
    assert "already exist" in line
    assert run("sd1", argv_for(tmp_path, overwrite=True), monkeypatch, capsys)[0] == "validated"
    assert (out / "lora.safetensors").read_bytes() == b"previous run"  # nothing touched before the run writes


def test_a_resumed_run_may_keep_its_earlier_saves(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("lora-00000004.safetensors", "lora-step00000004-state", "lora-000001.safetensors", "lora2.safetensors",
                 "lora-extra.safetensors"):
        (out / name).mkdir() if name.endswith("state") else (out / name).write_bytes(b"x")
    preflight.check_existing_outputs(str(out), "lora", TrainState(step=3, epoch=1))  # its own history: fine
    with pytest.raises(UserError, match=r"lora-\S*00000004\S* and 2 more"):
        preflight.check_existing_outputs(str(out), "lora", None)  # a fresh run would overwrite them
    (out / "lora.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="lora.safetensors"):  # the final file of a finished run: refused
        preflight.check_existing_outputs(str(out), "lora", TrainState(step=3, epoch=1))


def test_stale_temp_files_of_a_killed_save_are_removed_and_an_old_state_is_put_back(tmp_path):
    from library.fileio import remove_stale_temp_files
    out = tmp_path
    (out / ".lora.safetensors.ab12cd_x.tmp").write_bytes(b"torn")
    (out / ".lora-00000003.safetensors.k9j8h7g6.tmp").write_bytes(b"torn")
    (out / ".lora-000002.safetensors.ab12cd34.tmp.safetensors").write_bytes(b"torn")  # a LyCORIS module's
    (out / ".other.safetensors.ab12cd34.tmp").write_bytes(b"another run's")
    (out / "lora-00000003-state.tmp").mkdir()
    (out / "lora-00000002-state.old").mkdir()           # killed between the two renames: put back
    (out / "lora-00000001-state.old").mkdir()
    (out / "lora-00000001-state").mkdir()               # the rename finished: the .old copy goes
    removed = remove_stale_temp_files(str(out), "lora")
    assert len(removed) == 6
    assert sorted(os.listdir(out)) == [".other.safetensors.ab12cd34.tmp", "lora-00000001-state",
                                       "lora-00000002-state"]


# ---- #3 --output_config -----------------------------------------------------------------------------------------
def test_output_config_never_overwrites_without_the_flag(tmp_path):
    existing = tmp_path / "run.toml"
    existing.write_text("learning_rate = 0.001\n")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train_util.parse_args("sd1", ["--config_file", str(existing), "--output_config", "--network_dim", "8"])
    assert existing.read_text() == "learning_rate = 0.001\n"
    with pytest.raises(SystemExit) as e:
        train_util.parse_args("sd1", ["--config_file", str(existing), "--output_config", "--network_dim", "8",
                                      "--overwrite"])
    assert e.value.code == 0 and "network_dim = 8" in existing.read_text()
    dataset = tmp_path / "ds.toml"
    dataset.write_text("[general]\n")
    with pytest.raises(UserError, match="also an input"):
        train_util.parse_args("sd1", ["--config_file", str(dataset), "--output_config", "--dataset_config",
                                      str(dataset), "--overwrite"])
    assert dataset.read_text() == "[general]\n"


# ---- #12 unknown flags --------------------------------------------------------------------------------------------
def test_unknown_flag_is_one_line_with_a_suggestion(monkeypatch, capsys):
    code = train_util.run_cli(lambda args: None, "sd1", ["--netwrk_dim", "4"])
    assert one_line_error(code, capsys.readouterr().err) == \
        "error: unknown flag '--netwrk_dim' in the command line; did you mean '--network_dim'?"
    code = train_util.run_cli(lambda args: None, "sd1", ["--network_dim", "four"])
    one_line_error(code, capsys.readouterr().err, "--network_dim", "invalid int value")
    code = train_util.run_cli(lambda args: None, "sd1", ["--save_precision", "half"])
    one_line_error(code, capsys.readouterr().err, "--save_precision", "invalid choice")


# ---- #8 numbers that cannot work ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (dict(clip_skip=99), "--clip_skip: 99 is more than the text encoder's 2 layers"),
    (dict(clip_skip=0), "--clip_skip: 0"),
    (dict(learning_rate="nan"), "--learning_rate: nan"),
    (dict(learning_rate="inf"), "--learning_rate: inf"),
    (dict(unet_lr="nan"), "--unet_lr: nan"),
    (dict(mixed_precision="fp16"), "--mixed_precision fp16: needs a GPU"),
    (dict(max_data_loader_n_workers=-1), "--max_data_loader_n_workers: -1"),
    (dict(seed=2**64 + 1), "--seed"),
    (dict(seed=-1), "--seed"),
    (dict(network_dim=0), "--network_dim"),
    (dict(network_dim=-4), "--network_dim"),
    (dict(network_alpha=-1), "--network_alpha"),
    (dict(network_args="conv_dimm=4"), "did you mean 'conv_dim'"),
])
def test_numbers_that_cannot_work_fail_before_load(tmp_path, monkeypatch, capsys, flags, needle):
    if "mixed_precision" in flags:
        monkeypatch.setattr(preflight, "_cpu_only", lambda: True)
    one_line_error(*run("sd1", argv_for(tmp_path, **flags), monkeypatch, capsys), needle)


def test_bf16_on_cpu_and_a_valid_clip_skip_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "_cpu_only", lambda: True)
    assert run("sd1", argv_for(tmp_path, mixed_precision="bf16", clip_skip=2, seed=2**63 - 1), monkeypatch,
               capsys)[0] == "validated"


# ---- #10 --network_weights -----------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_network_weights_fail_before_load(tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    one_line_error(*run("sd1", argv_for(tmp_path, network_weights=garbage), monkeypatch, capsys),
                   "--network_weights", "not a readable .safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    one_line_error(*run("sd1", argv_for(tmp_path, network_weights=truncated), monkeypatch, capsys),
                   "--network_weights")
    payload = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2), "x": _Payload()}, str(payload))
    one_line_error(*run("sd1", argv_for(tmp_path, network_weights=payload), monkeypatch, capsys),
                   "--network_weights", "pickle holding objects other than tensors")
    pickled = tmp_path / "plain.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"a": 1}, f)
    one_line_error(*run("sd1", argv_for(tmp_path, network_weights=pickled), monkeypatch, capsys),
                   "--network_weights")


# ---- #6 / #7 model family --------------------------------------------------------------------------------------
def _fake_single_file(path, key):
    save_file({key: torch.zeros(1)}, str(path))
    return str(path)


@pytest.mark.parametrize("key,family,script", [
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl", "sdxl_train_network.py"),
    ("double_blocks.0.img_attn.qkv.weight", "flux", "flux_train_network.py"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux", "flux_train_network.py"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3", "sd3_train_network.py"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "sd1", "train_network.py"),
    ("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight", "sd1", "train_network.py --v2"),
])
def test_single_files_of_another_family_name_the_right_script(tmp_path, monkeypatch, capsys, key, family, script):
    from library.families import detect
    path = _fake_single_file(tmp_path / "model.safetensors", key)
    assert detect.detect(path).family == family
    for trainer in SCRIPTS:
        if trainer == family:
            continue
        line = one_line_error(*run(trainer, argv_for(tmp_path, model=path), monkeypatch, capsys),
                              "--pretrained_model_name_or_path", f"train it with {script}")
        assert SCRIPTS[trainer] in line


def test_folders_sd1_vs_sd2_and_v_prediction(tmp_path, monkeypatch, capsys):
    sd1, sd2 = tiny_sd1_paths()["diffusers"], tiny_sd1_paths(v2=True, v_prediction=True)["diffusers"]
    one_line_error(*run("sd1", argv_for(tmp_path, model=sd1, v2=True), monkeypatch, capsys),
                   "--v2", "SD1.x model", "remove --v2")
    one_line_error(*run("sd1", argv_for(tmp_path, model=sd2), monkeypatch, capsys), "--v2", "SD2.x", "add --v2")
    one_line_error(*run("sd1", argv_for(tmp_path, model=sd2, v2=True), monkeypatch, capsys),
                   "--v_parameterization", "predicts v")
    assert run("sd1", argv_for(tmp_path, model=sd2, v2=True, v_parameterization=True), monkeypatch,
               capsys)[0] == "validated"
    for trainer in ("sdxl", "sd3"):
        one_line_error(*run(trainer, argv_for(tmp_path, model=sd2), monkeypatch, capsys),
                       "SD2.x model", "train it with train_network.py --v2")


def test_an_sdxl_folder_given_to_the_sd1_trainer(tmp_path, monkeypatch, capsys):
    import json
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    one_line_error(*run("sd1", argv_for(tmp_path, model=str(folder)), monkeypatch, capsys),
                   "is an SDXL model", "train it with sdxl_train_network.py")

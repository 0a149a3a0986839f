"""Issue 13 #9, #14 and the disk-full case: a state folder is validated whole (manifest sizes and digests, every
file parses without running pickled code, train_state.json complete, flags compatible) before any model loads;
a save that fails or is interrupted keeps the previous state and leaves no temporary files."""
import errno
import json
import os

import pytest
import torch

from library import checkpointing
from library.checkpointing import TrainState
from library.errors import UserError
from tests.test_faults_preflight import _Payload, argv_for, one_line_error, run

FLAGS = dict(family="sd1", network_module="networks.lora", network_dim=4, network_alpha=2.0, network_args=[],
             optimizer_type="AdamW", timestep_clusters=0, world_size=1)


def save(folder, step=7, **flags):
    net = {"lora_unet_a.lora_down.weight": torch.randn(4, 8), "lora_unet_a.lora_up.weight": torch.randn(8, 4)}
    checkpointing.save_state(str(folder), network_state=net,
                             optimizer_state={"state": {0: {"exp_avg": torch.randn(4, 8)}}, "param_groups": []},
                             scheduler_state={"last_epoch": step}, engine_state={}, metrics_state={"x": 1},
                             train_state=TrainState(step=step, epoch=1, micro_in_epoch=2, seed=3, world_size=1),
                             run_flags={**FLAGS, **flags})
    return str(folder)


def test_a_saved_state_validates_and_lists_every_file(tmp_path):
    folder = save(tmp_path / "lora-00000007-state")
    state = checkpointing.validate_state_folder(folder, FLAGS)
    assert state == TrainState(step=7, epoch=1, micro_in_epoch=2, seed=3, world_size=1)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert sorted(manifest["files"]) == sorted(f for f in os.listdir(folder) if f != "manifest.json")
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == os.path.getsize(os.path.join(folder, name))
        assert entry["sha256"] == checkpointing.file_digest(os.path.join(folder, name))
    assert sorted(os.listdir(tmp_path)) == ["lora-00000007-state"]  # no .tmp / .old left


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _payload(path):
    torch.save({"last_epoch": 1, "evil": _Payload()}, path)


DAMAGE = {
    "truncated network": ("network.safetensors", _truncate, "network.safetensors has"),
    "truncated optimizer": ("optimizer.pt", _truncate, "optimizer.pt has"),
    "garbage scheduler": ("lr_scheduler.pt", lambda p: open(p, "wb").write(os.urandom(300)), "lr_scheduler.pt"),
    "bad json": ("train_state.json", lambda p: open(p, "w").write("{step: 3"), "train_state.json"),
    "empty json": ("train_state.json", lambda p: open(p, "w").write("{}"), "train_state.json has 2 bytes"),
    "bit flip": ("optimizer.pt", lambda p: _flip(p), "does not match its SHA-256"),
    "missing file": ("lr_scheduler.pt", os.remove, "no lr_scheduler.pt"),
    "bad manifest": ("manifest.json", lambda p: open(p, "w").write("[]"), "manifest.json is damaged"),
}


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_state_folders_are_one_line(tmp_path, case):
    folder = save(tmp_path / "s")
    name, damage, needle = DAMAGE[case]
    damage(os.path.join(folder, name))
    with pytest.raises(UserError, match="--resume") as e:
        checkpointing.validate_state_folder(folder, FLAGS)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["pickle payload", "empty json"])
def test_without_a_manifest_the_files_themselves_are_checked(tmp_path, case):
    """States from before manifests: a payload or `{}` is still refused (the manifest would not catch a payload
    written together with its own digest either)."""
    folder = save(tmp_path / "s")
    os.remove(os.path.join(folder, "manifest.json"))
    if case == "pickle payload":
        _payload(os.path.join(folder, "lr_scheduler.pt"))
        needle = "pickled objects other than tensors"
    else:
        open(os.path.join(folder, "train_state.json"), "w").write("{}")
        needle = "train_state.json must hold"
    with pytest.raises(UserError, match=needle):
        checkpointing.validate_state_folder(folder, FLAGS)


@pytest.mark.parametrize("flag,value,needle", [
    ("network_dim", 8, "--network_dim 4, this run has --network_dim 8"),
    ("optimizer_type", "Lion", "--optimizer_type AdamW, this run has --optimizer_type Lion"),
    ("network_module", "networks.lycoris", "--network_module"),
    ("world_size", 1, "2 process(es), this run has 1"),
    ("family", "sdxl", "saved by the sd1 trainer"),
])
def test_incompatible_flags_are_named(tmp_path, flag, value, needle):
    folder = save(tmp_path / "s", **({"world_size": 2} if flag == "world_size" else {}))
    with pytest.raises(UserError) as e:
        checkpointing.validate_state_folder(folder, {**FLAGS, flag: value})
    assert needle in str(e.value)
    checkpointing.validate_state_folder(folder, {**FLAGS, "optimizer_type": "adamw"}
                                        if flag != "world_size" else {**FLAGS, "world_size": 2})


def test_resume_errors_end_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """Through the trainer: a 2-process state resumed by 1 process, a malicious and a truncated state."""
    folder = save(tmp_path / "two", world_size=2)
    one_line_error(*run("sd1", argv_for(tmp_path, resume=folder, network_dim=4, network_alpha=2), monkeypatch,
                        capsys), "2 process(es), this run has 1")
    folder = save(tmp_path / "evil")
    _payload(os.path.join(folder, "optimizer.pt"))
    one_line_error(*run("sd1", argv_for(tmp_path, resume=folder, network_dim=4, network_alpha=2), monkeypatch,
                        capsys), "optimizer.pt")
    monkeypatch.setenv("WORLD_SIZE", "2")
    folder = save(tmp_path / "ok")
    one_line_error(*run("sd1", argv_for(tmp_path, resume=folder, network_dim=4, network_alpha=2), monkeypatch,
                        capsys), "1 process(es), this run has 2")


def test_an_old_folder_left_by_a_killed_save_is_named(tmp_path):
    folder = save(tmp_path / "s")
    os.replace(folder, folder + ".old")
    with pytest.raises(UserError, match="rename it"):
        checkpointing.validate_state_folder(folder, FLAGS)


# ---- disk full / failing writers -----------------------------------------------------------------------------
def _failing_torch_save(real, fail_on):
    def save_(obj, path, *a, **k):
        if os.path.basename(str(path)) == fail_on:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real(obj, path, *a, **k)
    return save_


def test_a_failed_state_save_keeps_the_previous_state_and_leaves_no_temp_files(tmp_path, monkeypatch):
    folder = save(tmp_path / "lora-state", step=5)
    before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    monkeypatch.setattr(torch, "save", _failing_torch_save(torch.save, "lr_scheduler.pt"))
    with pytest.raises(RuntimeError):
        save(tmp_path / "lora-state", step=9)
    assert sorted(os.listdir(tmp_path)) == ["lora-state"]
    assert {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == before
    assert checkpointing.validate_state_folder(folder, FLAGS).step == 5


def test_a_failed_lora_write_keeps_the_previous_file(tmp_path):
    from library.fileio import atomic_write
    from library.interrupts import SaveFailed, save_errors
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"previous")

    def disk_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SaveFailed) as e:
        with save_errors(str(path)):
            atomic_write(str(path), disk_full)
    assert "the disk is full" in str(e.value) and "MiB free" in str(e.value)
    assert os.listdir(tmp_path) == ["lora.safetensors"] and path.read_bytes() == b"previous"


def test_write_errors_are_one_line():
    from library.fileio import write_error_message
    assert "disk quota" in write_error_message(OSError(errno.EDQUOT, "Disk quota exceeded"), "/x/a")
    assert "not writable" in write_error_message(OSError(errno.EROFS, "Read-only file system"), "/x/a")
    assert "the disk is full" in write_error_message(Exception("No space left on device (os error 28)"), "/x/a")

"""LoRA metadata as KS writes it (library/metadata.py), key by key against tests/fixtures/ks_metadata.json (the keys
of KS's train_network.py, read from its source by tools/ks_flag_inventory.py)."""
import hashlib
import json
import os
import re


from library import metadata, train_util

with open(os.path.join(os.path.dirname(__file__), "fixtures", "ks_metadata.json"), encoding="utf-8") as f:
    KS = json.load(f)

# Value formats of keys whose KS expression is not a bool() / json.dumps (str() of KS's Python value).
FORMATS = {
    "ss_resolution": r"\(\d+, \d+\)",                      # str of KS's parsed tuple
    "ss_total_batch_size": r"\d+", "ss_batch_size_per_device": r"\d+", "ss_seed": r"\d+",
    "ss_steps": r"\d+", "ss_epoch": r"\d+", "ss_num_epochs": r"\d+", "ss_max_train_steps": r"\d+",
    "ss_sd_model_hash": r"[0-9a-f]{8}", "ss_new_sd_model_hash": r"[0-9a-f]{64}",
    "ss_optimizer": r"[\w.]+\.[A-Za-z]\w*(\(.*\))?",
    "ss_training_started_at": r"\d+\.\d+", "ss_training_finished_at": r"\d+\.\d+",
    "ss_network_dropout": "None", "ss_clip_skip": "None", "ss_min_snr_gamma": "None", "ss_unet_lr": "None",
    "ss_sd_model_name": r"[^/\\]+",
}


def _md(tmp_path, family="sd1", extra=(), num_processes=2):
    model = tmp_path / "model.safetensors"
    model.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: the old hash reads 64 KiB at offset 1 MiB
    args = train_util.parse_args(family, ["--pretrained_model_name_or_path", str(model), "--train_data_dir",
                                          str(tmp_path), "--output_dir", str(tmp_path), "--resolution", "64,96",
                                          "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                                          "--seed", "7", "--network_args", "conv_dim=4", *extra])
    args.network_module = args.network_module or "networks.lora"
    from library.families import get_adapter
    from library.loss_config import LossConfig

    prediction = "flow" if get_adapter(family).kind == "flow" else "epsilon"
    loss_md = LossConfig.from_args(args, family, prediction).metadata()
    md = metadata.training_metadata(args, family, num_train_images=10, num_reg_images=0, num_batches_per_epoch=4,
                                    num_epochs=3, started_at=1700000000.5, loss_metadata=loss_md,
                                    dataset_metadata={"ss_dataset_dirs": "{}", "ss_tag_frequency": "{}",
                                                      "ss_reg_dataset_dirs": "{}", "ss_bucket_info": "{}"},
                                    optimizer_name="torch.optim.adamw.AdamW", num_processes=num_processes)
    spec = metadata.modelspec(args, family, metadata.parse_resolution(args.resolution), 1700000000.0)
    return args, model, metadata.finish_metadata(md, 5, 1, modelspec_keys=spec)


def test_every_ks_key_is_written_in_ks_format(tmp_path):
    args, model, md = _md(tmp_path)
    expected = [k for k, v in KS["ss_keys"].items() if v["branch"] in ("always", "flags", "network_args")]
    missing = [k for k in expected if k not in md]
    assert not missing, f"KS keys not written: {missing}"
    for key in expected:
        pattern = FORMATS.get(key) or KS["ss_keys"][key]["format"]
        if pattern:
            assert re.fullmatch(pattern, md[key]), f"{key} = {md[key]!r} does not match {pattern}"
    assert all(isinstance(v, str) for v in md.values())


def test_ks_values(tmp_path):
    args, model, md = _md(tmp_path)
    assert md["ss_resolution"] == "(64, 96)"                            # KS: str of the parsed tuple
    assert md["ss_total_batch_size"] == str(3 * 2 * 2) and md["ss_batch_size_per_device"] == "3"
    assert md["ss_sd_model_name"] == "model.safetensors"                 # the file name, never the local path
    raw = model.read_bytes()
    assert md["ss_sd_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(raw).hexdigest()
    assert md["ss_network_dropout"] == "None" and md["ss_v2"] == "False" and md["ss_seed"] == "7"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_args"] == '{"conv_dim": "4"}'
    assert md["ss_steps"] == "5" and md["ss_epoch"] == "1" and md["ss_loss_type"] == "l2"
    assert str(tmp_path) not in json.dumps(md)                            # no user paths in a shared file


def test_modelspec_keys(tmp_path):
    args, _, md = _md(tmp_path, extra=["--output_name", "mylora", "--metadata_author", "me",
                                       "--metadata_tags", "a,b", "--metadata_trigger_phrase", "sks"])
    spec = {k: v for k, v in md.items() if k.startswith("modelspec.")}
    assert set(spec) <= set(KS["modelspec_keys"])
    assert spec["modelspec.sai_model_spec"] == "1.0.1"
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.implementation"] == "diffusers"
    assert spec["modelspec.title"] == "mylora" and spec["modelspec.author"] == "me"
    assert spec["modelspec.tags"] == "a,b" and spec["modelspec.trigger_phrase"] == "sks"
    assert spec["modelspec.resolution"] == "64x96" and spec["modelspec.prediction_type"] == "epsilon"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", spec["modelspec.date"])
    _, _, sdxl = _md(tmp_path, family="sdxl", extra=["--metadata_title", "T"])
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert sdxl["modelspec.title"] == "T" and sdxl["ss_base_model_version"] == "sdxl_base_v1-0"


def test_sd3_keys(tmp_path):
    _, _, md = _md(tmp_path, family="sd3")
    assert [k for k in KS["sd3_keys"] if k not in md] == []


def test_no_metadata_keeps_ks_minimum(tmp_path):
    args, _, md = _md(tmp_path)
    minimal = metadata.finish_metadata({k: v for k, v in md.items() if k.startswith("ss_")}, 5, 1, no_metadata=True,
                                       modelspec_keys={"modelspec.title": "x"})
    assert set(minimal) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args", "modelspec.title"}


def test_folder_models_hash_as_ks_does(tmp_path):
    assert metadata.model_hash(str(tmp_path)) == "IsADirectory" == metadata.calculate_sha256(str(tmp_path))

"""The argument layer: --config_file goes through the same checks as the command line, the CLI wins,
unknown keys name the closest flag, --snr_gamma aliases --min_snr_gamma, --output_config round-trips."""
import pytest
import toml

from library import train_util, optimizers
from library.errors import UserError


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_values_are_typed_and_cli_wins(tmp_path):
    path = write(tmp_path, """
[training]
learning_rate = 3e-4
max_train_steps = 250
gradient_checkpointing = true
optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)"]
[network]
network_dim = 16
""")
    args = train_util.parse_args("sd1", ["--config_file", path, "--max_train_steps", "10"])
    assert args.learning_rate == pytest.approx(3e-4)
    assert args.max_train_steps == 10  # the command line wins over the file
    assert args.gradient_checkpointing is True
    assert args.network_dim == 16 and isinstance(args.network_dim, int)
    assert args.optimizer_args == ["weight_decay=0.01", "betas=(0.9,0.99)"]


@pytest.mark.parametrize("text,needle", [
    ("learning_rat = 1e-4", "did you mean 'learning_rate'"),
    ("max_train_steps = 'ten'", "max_train_steps"),
    ("max_train_steps = 1.5", "integer"),
    ("gradient_checkpointing = 'yes'", "true or false"),
    ("mixed_precision = 'fp32'", "must be one of"),
    ("network_dim = [4, 8]", "single value"),
])
def test_config_file_errors_name_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        train_util.parse_args("sd1", ["--config_file", path])
    assert needle in str(e.value)
    assert path in str(e.value) or "did you mean" in str(e.value)


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_util.parse_args("sd1", ["--config_file", str(tmp_path / "nope.toml")])
    path = write(tmp_path, "learning_rate = = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        train_util.parse_args("sd1", ["--config_file", path])


def test_snr_gamma_alias(tmp_path):
    args = train_util.parse_args("sd1", ["--snr_gamma", "5"])
    assert args.min_snr_gamma == 5
    path = write(tmp_path, "snr_gamma = 3.0\ntraining_shift = 3.0\n")
    args = train_util.parse_args("sd3", ["--config_file", path])
    assert args.min_snr_gamma == 3.0 and args.timestep_shift == 3.0


def test_family_specific_flags():
    # KS's SDXL parser knows --v2 (and refuses it later, as here: tests/test_ks_compat.py); unknown flags stop
    assert train_util.parse_args("sdxl", ["--v2"]).v2 is True
    with pytest.raises(UserError, match="unknown flag '--precondition_outputs'"):
        train_util.parse_args("sdxl", ["--precondition_outputs"])
    assert train_util.parse_args("sd3", ["--precondition_outputs"]).precondition_outputs is True
    assert train_util.parse_args("sdxl", []).bucket_reso_steps == 64   # KS: 64 for every script
    assert train_util.parse_args("sd1", []).bucket_reso_steps == 64


def test_output_config_round_trip(tmp_path):
    out = str(tmp_path / "effective.toml")
    with pytest.raises(SystemExit) as e:
        train_util.parse_args("sd1", ["--learning_rate", "2e-4", "--network_dim", "8", "--shuffle_caption",
                                      "--output_config", "--config_file", out])
    assert e.value.code == 0
    written = toml.load(out)
    assert written["learning_rate"] == pytest.approx(2e-4) and written["network_dim"] == 8
    assert written["shuffle_caption"] is True
    args = train_util.parse_args("sd1", ["--config_file", out])
    assert args.learning_rate == pytest.approx(2e-4) and args.network_dim == 8 and args.shuffle_caption


def test_run_cli_prints_user_errors_without_traceback(tmp_path, capsys):
    def main(args):
        raise UserError("--foo: bad")
    assert train_util.run_cli(main, "sd1", []) == 2
    assert capsys.readouterr().err.strip() == "error: --foo: bad"


def test_optimizer_names_and_args():
    with pytest.raises(UserError, match="did you mean AdamW8bit"):
        optimizers.resolve_optimizer("AdamW8bt")
    assert optimizers.parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)", "foo=bar"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "foo": "bar"}
    with pytest.raises(UserError, match="optimizer_args"):
        optimizers.validate_optimizer_options("AdamW", ["not_an_arg=1"])
    optimizers.validate_optimizer_options("torch.optim.SGD", ["momentum=0.9"])
    assert optimizers.warmup_steps(0.1, 500) == 50 and optimizers.warmup_steps(20, 500) == 20


def test_flags_without_effect_are_refused_or_named(tmp_path, capsys):
    """No silent ignores: --full_fp16 without its --mixed_precision is refused; KS compatibility flags that are
    always-on here are named."""
    from library import training_loop
    from library.families import get_adapter

    (tmp_path / "1_x").mkdir()
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path), "--output_dir",
            str(tmp_path)]
    args = train_util.parse_args("sd1", base + ["--mixed_precision", "bf16", "--full_fp16"])
    with pytest.raises(UserError, match="full_fp16"):
        training_loop.validate(args, get_adapter("sd1"))
    args = train_util.parse_args("sd1", base + ["--sdpa", "--lowram"])
    with pytest.raises(UserError):  # the folder is no model; the notes come first
        training_loop.validate(args, get_adapter("sd1"))
    out = capsys.readouterr().out
    assert "--sdpa has no effect" in out and "--lowram has no effect" in out

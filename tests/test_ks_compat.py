"""Every flag of KS's three LoRA trainers is known here with KS's name, type, default and choices, and has one
recorded disposition (library/ks_compat.py); docs/kohya-compat.md is generated from that table."""
import json
import os

import pytest

from library import ks_compat, train_util
from library.errors import UserError

FAMILIES = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py", "sd3": "sd3_train_network.py"}

# Flags other changes implement right now: not checked against KS yet. The lead clears this set as they land
# (and turns their `pending(...)` entries in library/ks_compat.py into their real dispositions).
PENDING: set[str] = set()  # flags another change is implementing right now (none)

# Defaults that differ in value but not in meaning: --training_shift is our --timestep_shift, whose None means
# "no shift" (KS: 1.0, the identity shift); None lets the loss options tell "not given" from an explicit 1.0.
EQUIVALENT_DEFAULTS = {"training_shift": (None, 1.0)}


def _ks(script):
    with open(ks_compat.FIXTURE, encoding="utf-8") as f:
        return json.load(f)["scripts"][script]


def _ours(family):
    parser = train_util.setup_parser(family)
    return parser, {opt: a for a in parser._actions for opt in a.option_strings}


def _type_name(action):
    return None if action.type is None else getattr(action.type, "__name__", repr(action.type))


def _kind(action):
    from tools.ks_flag_inventory import action_kind
    return action_kind(action)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_ks_flag_is_known_with_ks_type_default_and_choices(family):
    _, ours = _ours(family)
    problems = []
    for entry in _ks(FAMILIES[family]):
        name = entry["flags"][0].lstrip("-")
        if name in PENDING:
            continue
        action = ours.get(entry["flags"][0])
        if action is None:
            problems.append(f"{name}: unknown here")
            continue
        got = {"action": _kind(action), "type": _type_name(action), "default": action.default,
               "choices": None if action.choices is None else list(action.choices), "nargs": action.nargs}
        want = {k: entry[k] for k in got}
        if EQUIVALENT_DEFAULTS.get(name) == (got["default"], want["default"]):
            got["default"] = want["default"]
        if got["choices"] is not None and want["choices"] is not None:
            # every KS value is accepted; values beyond KS's are our additions (e.g. more --loss_type choices)
            if set(map(str, want["choices"])) <= set(map(str, got["choices"])):
                got["choices"] = want["choices"]
        for key in got:
            if got[key] != want[key]:
                problems.append(f"{name}: {key} {got[key]!r}, KS {want[key]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_ks_flag_has_one_disposition_and_pending_matches(family):
    missing, wrong_pending = [], []
    for entry in _ks(FAMILIES[family]):
        name = entry["flags"][0].lstrip("-")
        d = ks_compat.disposition(name, family)
        if d is None:
            missing.append(name)
        elif (d.kind == ks_compat.PENDING) != (name in PENDING):
            wrong_pending.append(name)
        elif d.kind in (ks_compat.REFUSED, ks_compat.NO_OP):
            assert len(d.text) > 20, f"--{name}: say why"
    assert not missing, f"no disposition: {missing}"
    assert not wrong_pending, f"pending in ks_compat but not in PENDING (or the reverse): {wrong_pending}"


def test_help_lists_every_ks_flag():
    for family, script in FAMILIES.items():
        text = train_util.setup_parser(family).format_help()
        absent = [e["flags"][0] for e in _ks(script) if e["flags"][0].lstrip("-") not in PENDING
                  and e["flags"][0] + " " not in text and e["flags"][0] + "\n" not in text]
        assert not absent, f"{family} --help lacks {absent}"


def test_compat_doc_is_generated_from_the_table():
    with open(ks_compat.DOC, encoding="utf-8") as f:
        assert f.read() == ks_compat.markdown(), "run: python -m library.ks_compat --write"
    text = ks_compat.markdown()
    for script in FAMILIES.values():
        for e in _ks(script):
            assert f"| `{e['flags'][0]}` |" in text


def _validate(tmp_path, family, *extra):
    from library import training_loop
    from library.families import get_adapter

    (tmp_path / "1_x").mkdir(exist_ok=True)
    args = train_util.parse_args(family, ["--pretrained_model_name_or_path", str(tmp_path / "no_model"),
                                          "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path), *extra])
    return training_loop.validate(args, get_adapter(family))


@pytest.mark.parametrize("family, flags, needle", [
    ("sd1", ["--deepspeed"], "--deepspeed: DeepSpeed is not supported"),
    ("sd1", ["--zero_stage", "3"], "--zero_stage"),
    ("sd1", ["--huggingface_repo_id", "me/lora"], "huggingface-cli upload"),
    ("sd1", ["--save_model_as", "ckpt"], "only safetensors"),
    ("sdxl", ["--v2"], "--v2"),
    ("sd1", ["--initial_step", "10"], "--resume"),
    ("sd1", ["--weighted_captions"], "(word:1.2)"),
])
def test_refused_flags_stop_before_any_model_loads(tmp_path, family, flags, needle):
    with pytest.raises(UserError) as e:
        _validate(tmp_path, family, *flags)
    assert needle in str(e.value)


def test_no_op_flags_print_one_note_and_defaults_print_none(tmp_path, capsys):
    with pytest.raises(UserError):  # no model there: the notes come before that
        _validate(tmp_path, "sdxl", "--clip_skip", "2", "--mem_eff_attn", "--highvram")
    out = capsys.readouterr().out
    for flag in ("--clip_skip", "--mem_eff_attn", "--highvram"):
        assert out.count(f"note: {flag} has no effect here") == 1
    with pytest.raises(UserError, match="no_model|does not exist|not a"):
        _validate(tmp_path, "sd1", "--zero_stage", "2", "--dynamo_backend", "inductor")  # KS defaults: accepted
    assert "note:" not in capsys.readouterr().out


@pytest.mark.slow
def test_inventory_tool_reproduces_the_fixture(tmp_path):
    """tools/ks_flag_inventory.py, run on the KS mirror, writes exactly the checked-in list."""
    git_dir = "/work/.mirror/kohya-ss+sd-scripts/repo"
    if not os.path.isdir(git_dir):
        pytest.skip("no KS mirror on this machine")
    from tools import ks_flag_inventory

    with open(ks_compat.FIXTURE, encoding="utf-8") as f:
        fixture = json.load(f)
    out = tmp_path / "flags.json"
    ks_flag_inventory.main(["--git-dir", git_dir, "--commit", fixture["source"]["commit"], "--out", str(out)])
    assert json.loads(out.read_text()) == fixture
    counts = {s: len(v) for s, v in fixture["scripts"].items()}
    assert counts == {"train_network.py": 193, "sdxl_train_network.py": 196, "sd3_train_network.py": 218}

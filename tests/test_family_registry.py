"""The family registry (library/families): the only place that names a family.

Outside library/families/ the code asks the registry; a string naming a registered family used in a comparison,
an `in` test, a dict key, a subscript or a match case is a second copy of family knowledge (issue 15).
"""
from __future__ import annotations

import ast
import os
from dataclasses import fields

import pytest

from library import families
from library.loss_config import PREDICTION_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_FOLDERS = ("library", "networks", "tools")
REGISTRY_FOLDER = os.path.join("library", "families")


def _sources() -> list[str]:
    """Repo-relative paths of library/ (without library/families/), networks/, tools/ and the entry scripts."""
    paths = [name for name in os.listdir(ROOT) if name.endswith(".py")]
    for folder in SCANNED_FOLDERS:
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, ROOT)
            if rel == REGISTRY_FOLDER or rel.startswith(REGISTRY_FOLDER + os.sep):
                continue
            paths += [os.path.join(rel, f) for f in filenames if f.endswith(".py")]
    return sorted(paths)


def _names_in(node: ast.AST, known: set[str]) -> list[ast.Constant]:
    """String constants naming a family in an expression (tuples, lists and sets included)."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known]


def family_name_uses(source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, family name) of every family name compared, tested with `in`, used as a dict key or subscript, or
    matched in a `case`."""
    found: list[ast.Constant] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            found += _names_in(node, known)
        elif isinstance(node, ast.Dict):
            found += [c for key in node.keys if key is not None for c in _names_in(key, known)]
        elif isinstance(node, ast.Subscript):
            found += _names_in(node.slice, known)
        elif isinstance(node, ast.MatchValue):
            found += _names_in(node.value, known)
    return sorted((c.lineno, c.value) for c in found)


def test_nothing_outside_the_registry_compares_a_family_name():
    known = set(families.names(aliases=True))
    offenders = []
    for path in _sources():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            offenders += [f"{path}:{line}: '{name}'" for line, name in family_name_uses(f.read(), known)]
    assert not offenders, "ask library.families instead of naming a family:\n" + "\n".join(offenders)


def test_the_checker_catches_the_code_it_replaced():
    """Lines from before the registry (train_util, loss_config, lora_keys, lora.py, make_tiny_model) and a match."""
    known = set(families.names(aliases=True))
    before = '''
g.add_argument("--bucket_reso_steps", type=int, default=32 if family == "sdxl" else 64)
if family in ("sdxl", "sd3"):
    pass
FAMILY_KINDS = {"sd1": "ddpm", "sd2": "ddpm", "sdxl": "ddpm", "sd3": "flow"}
file_format = "peft" if self.family == "sd3" else "kohya"
kind = FAMILY_KINDS["sd3"]
match family:
    case "sd1":
        pass
'''
    assert family_name_uses(before, known) == [(2, "sdxl"), (3, "sd3"), (3, "sdxl"), (5, "sd1"), (5, "sd2"),
                                               (5, "sd3"), (5, "sdxl"), (6, "sd3"), (7, "sd3"), (9, "sd1")]
    # passing a name along (entry scripts, defaults) is not a comparison
    assert family_name_uses('run_cli(main, "sd1")\nparser.add_argument("--family", default="sd1")', known) == []


@pytest.mark.parametrize("family", families.all_families(), ids=lambda f: f.name)
def test_every_entry_is_complete(family):
    from library import train_util

    assert family.kind in PREDICTION_TYPES and set(family.prediction_types) <= set(PREDICTION_TYPES[family.kind])
    assert families.get_family(family.name) is family and families.kind_of(family.name) == family.kind
    assert family.lora_unet_targets is not None and family.lora_file_format in ("kohya", "peft")
    # the entry script is thin and runs this family
    with open(os.path.join(ROOT, family.entry_script), encoding="utf-8") as f:
        script = f.read()
    assert f'get_adapter("{family.name}")' in script and f'run_cli(main, "{family.name}")' in script
    assert len(script.splitlines()) <= 20
    # every option has its flag in the family's parser (the options dataclass is read from the flags)
    dests = {a.dest for a in train_util.setup_parser(family.name)._actions}
    assert {f.name for f in fields(family.options_class)} - {"weight_dtype"} <= dests
    assert train_util.setup_parser(family.name).get_default("bucket_reso_steps") == family.bucket_reso_steps


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ValueError, match="known: sd1, sd2, sdxl, sd3, flux, chroma"):
        families.get_family("pixart")
    assert families.kind_of("pixart") is None and families.kind_of("sd2") == "ddpm"

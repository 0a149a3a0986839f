"""Write the inventory of kohya sd-scripts' (KS) argparse flags: tests/fixtures/ks_flags.json.

    python tools/ks_flag_inventory.py --ks /path/to/sd-scripts            # a checkout
    python tools/ks_flag_inventory.py --git-dir /path/to/sd-scripts.git   # a bare repository (reads HEAD)

How: KS's own parser-building functions run for real (so conditionals such as
`add_dataset_arguments(parser, True, True, True)` take KS's branches), but nothing else of KS executes. The source
of each script is parsed with `ast`; a function is compiled from its source only when `setup_parser` reaches it,
and every free name it uses is resolved first: another KS function (compiled the same way, module by module),
a module-level constant, a standard-library module, or a stand-in object for everything else (torch, diffusers,
...), which the flag definitions never need. Importing KS the normal way would need its exact pins (it breaks
on transformers 5). The result per script: every flag's option strings, dest, type, default, choices, nargs and
action, in KS's order.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import json
import os
import subprocess
import sys
from typing import Any
from unittest import mock

SCRIPTS = ("train_network.py", "sdxl_train_network.py", "sd3_train_network.py")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
FIXTURE = os.path.join(FIXTURES, "ks_flags.json")
METADATA_FIXTURE = os.path.join(FIXTURES, "ks_metadata.json")


class _Source:
    """Reads files of a KS checkout or of a git repository at one commit."""

    def __init__(self, ks_dir: str | None = None, git_dir: str | None = None, commit: str = "HEAD"):
        self.ks_dir, self.git_dir = ks_dir, git_dir
        self.commit = self._git("rev-parse", commit).strip() if git_dir else self._checkout_commit()

    def _git(self, *cmd: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *cmd], check=True, capture_output=True,
                              text=True).stdout

    def _checkout_commit(self) -> str | None:
        try:
            return subprocess.run(["git", "-C", self.ks_dir, "rev-parse", "HEAD"], check=True, capture_output=True,
                                  text=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    def read(self, path: str) -> str | None:
        if self.git_dir:
            try:
                return self._git("show", f"{self.commit}:{path}")
            except subprocess.CalledProcessError:
                return None
        full = os.path.join(self.ks_dir, path)
        if not os.path.isfile(full):
            return None
        with open(full, encoding="utf-8") as f:
            return f.read()


def _free_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


class _Module:
    """One KS module, evaluated on demand: only the definitions someone asks for."""

    def __init__(self, loader: "_Loader", dotted: str, text: str):
        self.loader, self.dotted, self.text = loader, dotted, text
        self.tree = ast.parse(text)
        self.defs: dict[str, ast.AST] = {}
        self.assigns: dict[str, ast.expr] = {}
        self.imports: dict[str, tuple[str, str | None]] = {}  # alias -> (module, attribute or None)
        package = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.assigns[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.assigns[node.target.id] = node.value
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.imports[a.asname] = (a.name, None)
                    else:
                        self.imports[a.name.split(".")[0]] = (a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(filter(None, [package, base]))
                for a in node.names:
                    self.imports[a.asname or a.name] = (base, a.name)
        self.namespace: dict[str, Any] = {"__name__": dotted, "argparse": argparse}

    def get(self, name: str) -> Any:
        if name in self.namespace:
            return self.namespace[name]
        if hasattr(builtins, name) and name not in self.defs and name not in self.assigns:
            return getattr(builtins, name)
        self.namespace[name] = mock.MagicMock(name=f"{self.dotted}.{name}")  # cycle guard / fallback
        if name in self.defs and isinstance(self.defs[name], ast.FunctionDef):
            node = self.defs[name]
            self._resolve(_free_names(node) - {name})
            code = compile(ast.Module(body=[node], type_ignores=[]), f"<ks {self.dotted}>", "exec")
            exec(code, self.namespace)
        elif name in self.assigns:
            value = self.assigns[name]
            self._resolve(_free_names(value))
            try:
                self.namespace[name] = eval(compile(ast.Expression(value), f"<ks {self.dotted}>", "eval"),
                                            self.namespace)
            except Exception:
                pass  # a value computed from a stand-in stays a stand-in
        elif name in self.imports:
            module, attribute = self.imports[name]
            self.namespace[name] = self.loader.resolve(module, attribute)
        return self.namespace[name]

    def _resolve(self, names: set[str]) -> None:
        for n in sorted(names):
            if n in self.defs or n in self.assigns or n in self.imports:
                self.get(n)


class _ModuleProxy:
    def __init__(self, module: _Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return self._module.get(name)


class _Loader:
    def __init__(self, source: _Source):
        self.source = source
        self.modules: dict[str, _Module | None] = {}

    def module(self, dotted: str) -> _Module | None:
        if dotted not in self.modules:
            text = self.source.read(dotted.replace(".", "/") + ".py")
            if text is None:
                text = self.source.read(dotted.replace(".", "/") + "/__init__.py")
            self.modules[dotted] = _Module(self, dotted, text) if text is not None else None
        return self.modules[dotted]

    def resolve(self, module: str, attribute: str | None) -> Any:
        if module.split(".")[0] in sys.stdlib_module_names:
            imported = __import__(module, fromlist=["_"] if attribute else [])
            return getattr(imported, attribute, mock.MagicMock()) if attribute else imported
        if attribute is not None and self.module(f"{module}.{attribute}") is not None:
            return _ModuleProxy(self.module(f"{module}.{attribute}"))
        found = self.module(module)
        if found is None:
            return mock.MagicMock(name=f"{module}.{attribute}")
        return found.get(attribute) if attribute else _ModuleProxy(found)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def action_kind(action: argparse.Action) -> str:
    """argparse's action name: 'store', 'store_true', 'store_false', 'store_const', 'append', ..."""
    names = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
             argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
             argparse._AppendAction: "append", argparse._CountAction: "count"}
    return names.get(type(action), type(action).__name__)


def type_name(action: argparse.Action) -> str | None:
    t = action.type
    if t is None:
        return None
    return getattr(t, "__name__", repr(t))


def describe(parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """Every optional flag of a parser (not -h), as plain JSON values."""
    out = []
    for a in parser._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        out.append({"flags": list(a.option_strings), "dest": a.dest, "action": action_kind(a), "type": type_name(a),
                    "default": _jsonable(a.default), "choices": _jsonable(a.choices), "nargs": _jsonable(a.nargs)})
    return out


def ks_parsers(source: _Source) -> dict[str, argparse.ArgumentParser]:
    loader = _Loader(source)
    return {script: loader.module(script[:-3]).get("setup_parser")() for script in SCRIPTS}


def inventory(source: _Source) -> dict[str, Any]:
    return {"source": {"repository": "https://github.com/kohya-ss/sd-scripts", "commit": source.commit},
            "generated_by": "tools/ks_flag_inventory.py",
            "scripts": {script: describe(p) for script, p in ks_parsers(source).items()}}


# ----------------------------------------------------------------------------------------------------------------
# LoRA metadata keys (KS train_network.py: the `metadata` dict, its updates and item assignments)
# ----------------------------------------------------------------------------------------------------------------
def _value_format(value: ast.expr) -> str | None:
    """A regex for the string KS writes (str(value)), where the expression says it; None: any text."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "bool":
        return "True|False"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "dumps":
        return r"[\[{].*"  # json.dumps of a dict / list
    return None


def metadata_keys(source: _Source) -> dict[str, Any]:
    """`ss_*` keys KS's LoRA trainer writes, each with the branch it belongs to ('always', 'dataset_toml' when a
    --dataset_config is used, 'flags' when it is not, or the flag it needs), plus the SD3 trainer's extra keys
    and the modelspec keys of sai_model_spec. Formats: regexes where the KS expression fixes them."""
    keys: dict[str, dict[str, Any]] = {}

    def add(key, value, branch):
        if key.startswith("ss_") and key not in keys:
            keys[key] = {"branch": branch, "format": _value_format(value) if value is not None else None}

    train = ast.parse(source.read("train_network.py"))
    for node in ast.walk(train):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "metadata" and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant):
                        add(k.value, v, "always")
            if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                    and target.value.id == "metadata" and isinstance(target.slice, ast.Constant)):
                key = target.slice.value
                branch = ("dataset_toml" if key in ("ss_datasets",) else "vae" if "vae" in key
                          else "network_args" if key == "ss_network_args" else "always")
                add(key, node.value, branch)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "metadata" and node.args
                and isinstance(node.args[0], ast.Dict)):
            for k, v in zip(node.args[0].keys, node.args[0].values):
                if isinstance(k, ast.Constant):
                    add(k.value, v, "flags")
    sd3 = ast.parse(source.read("sd3_train_network.py"))
    sd3_keys = sorted({t.slice.value for t in ast.walk(sd3) if isinstance(t, ast.Subscript)
                       and isinstance(t.value, ast.Name) and t.value.id == "metadata"
                       and isinstance(t.slice, ast.Constant) and str(t.slice.value).startswith("ss_")})
    spec = ast.parse(source.read("library/sai_model_spec.py"))
    modelspec = []
    for node in spec.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BASE_METADATA":
            modelspec = [k.value for k in node.value.keys]
    return {"source": {"repository": "https://github.com/kohya-ss/sd-scripts", "commit": source.commit},
            "generated_by": "tools/ks_flag_inventory.py", "ss_keys": keys, "sd3_keys": sd3_keys,
            "modelspec_keys": modelspec}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ks", help="a KS checkout folder")
    where.add_argument("--git-dir", help="a KS git repository (bare or .git)")
    p.add_argument("--commit", default="HEAD", help="with --git-dir: the commit to read")
    p.add_argument("--out", default=FIXTURE)
    p.add_argument("--metadata-out", default=METADATA_FIXTURE)
    a = p.parse_args(argv)
    source = _Source(ks_dir=a.ks, git_dir=a.git_dir, commit=a.commit)
    with open(a.metadata_out, "w", encoding="utf-8") as f:
        json.dump(metadata_keys(source), f, indent=1, ensure_ascii=False)
        f.write("\n")
    data = inventory(source)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    counts = ", ".join(f"{s}: {len(v)}" for s, v in data["scripts"].items())
    print(f"wrote {a.out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

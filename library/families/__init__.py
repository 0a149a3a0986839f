"""The family registry: the one place that knows which model families exist.

Each family module holds one `Family` entry (library/families/base.py) named `FAMILY`; this list names the
modules. Everything outside library/families/ asks here (`get_family(name)`, `all_families()`,
`detect_family(denoiser)`, `kind_of(name)`) and never compares a family name (tests/test_family_registry.py).
"""
from __future__ import annotations

import importlib
from typing import Any

from library.families.base import Family

# In detection order reversed: a later entry's `detects` is tried first (sd1 accepts any UNet).
_MODULES = ("library.families.sd1", "library.families.sdxl", "library.families.sd3", "library.families.flux",
            "library.families.chroma")


def all_families() -> list[Family]:
    """Every registered family, in registration order."""
    return [importlib.import_module(module).FAMILY for module in _MODULES]


def names(aliases: bool = False) -> tuple[str, ...]:
    """Registered family names (with aliases: each family's aliases right after its name)."""
    return tuple(n for f in all_families() for n in (f.name, *(f.aliases if aliases else ())))


def get_family(name: str) -> Family:
    """The entry for a family name or alias; ValueError names the known ones."""
    for family in all_families():
        if name == family.name or name in family.aliases:
            return family
    raise ValueError(f"unknown family '{name}'; known: {', '.join(names(aliases=True))}")


def get_adapter(family: str):
    """The adapter instance for a family name."""
    return get_family(family).adapter()


def kind_of(name: str, default: str | None = None) -> str | None:
    """'ddpm' | 'flow' for a family name or alias; `default` for an unknown name."""
    try:
        return get_family(name).kind
    except ValueError:
        return default


def batch_keys() -> tuple[str, ...]:
    """Every family's per-sample batch extras (e.g. SDXL's size conditioning), each once."""
    return tuple(dict.fromkeys(k for f in all_families() for k in f.batch_keys))


def detect_family(denoiser: Any) -> Family:
    """The family whose denoiser this is (by class and config, not by file name)."""
    for family in reversed(all_families()):
        if family.detects(denoiser):
            return family
    raise ValueError(f"no registered family recognises a {type(denoiser).__name__}")

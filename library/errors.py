"""User-facing errors: a mistake in flags, config files or data, reported without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A user mistake. The message names the flag, key or file and says how to fix it.

    Entry points catch it, print ``error: <message>`` and exit with status 2."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt one, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_key_message(key: str, candidates: Iterable[str], where: str, kind: str = "key") -> str:
    """'unknown key X in WHERE; did you mean Y?' for config and dataset files (kind="flag" for the command line)."""
    suggestion = closest(key, candidates)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown {kind} '{key}' in {where}{hint}"

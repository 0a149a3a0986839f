"""Which model family a checkpoint is, read from its configs or tensor names before anything loads.

A diffusers folder is recognised by `model_index.json` (`_class_name`) and its component configs; a single
`.safetensors` file by its tensor names (header only, no tensor is read). Flux.1 and Chroma single files by their BFL transformer names
(`double_blocks.*`, Chroma's `distilled_guidance_layer.*`). SD2 is told from SD1 by the text
encoder (OpenCLIP: `gelu`, SD1's OpenAI CLIP: `quick_gelu`; in single files `cond_stage_model.model.*` vs
`cond_stage_model.transformer.*`); v-prediction by the scheduler's `prediction_type` (folders only: a single file
does not say).

Each registry entry recognises its own checkpoints (`Family.recognise: (Checkpoint) -> Detected | None`, in the
family's module); `detect` asks them, the most specific first. `check_family` compares what was found with the
trainer and the flags and names the right script (`Family.entry_script`) and flags when they disagree.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field

from library.errors import UserError

FLAG = "--pretrained_model_name_or_path"


@dataclass
class Detected:
    family: str                   # the registry name of the trainer family (SD1.x and SD2.x share one)
    what: str                     # human name: "SD1.x", "SD2.x", "SDXL", "SD3"
    v2: bool = False              # SD2.x architecture (needs --v2)
    v_prediction: bool | None = None   # None: the checkpoint does not say
    text_layers: int | None = None     # layers of the (first) text encoder, for --clip_skip
    trainers: tuple[str, ...] = ()     # other families whose trainers take it too (their `check` sees the flags)
    hint: str = ""                     # appended to "train it with <script>" (another way to train it)


@dataclass
class Checkpoint:
    """What can be read about a model without loading it."""
    path: str
    kind: str                                   # "diffusers" | "single_file"
    keys: frozenset[str] = frozenset()          # tensor names (single files)
    pipeline_class: str = ""                    # model_index.json _class_name (folders)
    _configs: dict = field(default_factory=dict)

    def config(self, subfolder: str, name: str = "config.json") -> dict:
        """A component's JSON config of a folder ({} when absent or unreadable)."""
        key = (subfolder, name)
        if key not in self._configs:
            self._configs[key] = _read_json(os.path.join(self.path, subfolder, name))
        return self._configs[key]

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def max_index(self, pattern: str) -> int | None:
        """The largest N of keys matching `pattern` (a regex with one group capturing N)."""
        found = [int(m.group(1)) for k in self.keys for m in [re.match(pattern, k)] if m]
        return max(found) if found else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------------------
# Helpers for the families' recognisers (`Family.recognise`, in each family module)
# ----------------------------------------------------------------------------------------------------------------
def folder_prediction(ckpt: Checkpoint) -> bool | None:
    """True / False when a folder's scheduler names v_prediction / another prediction type; None when silent."""
    prediction = ckpt.config("scheduler", "scheduler_config.json").get("prediction_type")
    return None if prediction is None else prediction == "v_prediction"


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint
# ----------------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Checkpoint | None:
    """Configs (folder) or tensor names (single .safetensors); None for what cannot be read cheaply (pickles,
    hub ids, a missing path: the model loader reports those)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        index = _read_json(os.path.join(path, "model_index.json"))
        return Checkpoint(path, "diffusers", pipeline_class=str(index.get("_class_name", "")))
    if os.path.isfile(path) and path.lower().endswith((".safetensors", ".sft")):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return Checkpoint(path, "single_file", keys=frozenset(f.keys()))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{FLAG}: '{path}' is not a readable .safetensors file ({e}); re-download or "
                            "re-export it") from None
    return None


@functools.lru_cache(maxsize=16)
def _detect_cached(path: str, mtime_ns: int) -> Detected | None:
    ckpt = read_checkpoint(path)
    if ckpt is None:
        return None
    from library.families import all_families
    for family in reversed(all_families()):  # the most specific first, as the registry's `detects`
        found = family.recognise(ckpt)
        if found is not None:
            return found
    return None


def detect(path: str) -> Detected | None:
    """The family of a diffusers folder or single .safetensors file, or None when it cannot be told."""
    expanded = os.path.expanduser(path)
    try:
        mtime = os.stat(expanded).st_mtime_ns
    except OSError:
        return None
    return _detect_cached(expanded, mtime)


def _entry_script(family: str) -> str:
    from library.families import get_family
    try:
        return get_family(family).entry_script
    except ValueError:
        return f"the {family} trainer"


def check_family(path: str, family: str, v2: bool, v_parameterization: bool) -> Detected | None:
    """UserError when the model at `path` is not what this trainer and these flags expect; names the fix."""
    found = detect(path)
    if found is None:
        return None
    script = _entry_script(found.family)
    if found.family != family and family not in found.trainers:
        extra = (" --v2" if found.v2 else "") + found.hint
        article = "an" if found.what.startswith("S") else "a"
        raise UserError(f"{FLAG}: '{path}' is {article} {found.what} model, but this is {_entry_script(family)}; "
                        f"train it with {script}{extra}")
    if found.v2 and not v2:
        raise UserError(f"--v2: '{path}' is an SD2.x model (OpenCLIP text encoder); add --v2"
                        + ("" if v_parameterization or found.v_prediction is False
                           else " (and --v_parameterization for the 768-v models)"))
    if family == "sd1" and v2 and not found.v2:
        raise UserError(f"--v2: '{path}' is an SD1.x model (CLIP ViT-L text encoder); remove --v2")
    if found.v_prediction and not v_parameterization:
        raise UserError(f"--v_parameterization: '{path}' predicts v (its scheduler's prediction_type is "
                        "v_prediction); add --v_parameterization")
    return found

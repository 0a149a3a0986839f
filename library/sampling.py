"""Sample images during training (KS ``--sample_prompts``, ``--sample_every_n_steps``, ``--sample_sampler``).

    prompts = parse_prompt_file(args.sample_prompts)              # KS .txt / .toml / .json prompt files
    paths = generate_samples(adapter, models, prompts, args.output_dir, sample_label(step=step),
                             args.sample_sampler, seed=args.seed, output_name=args.output_name, network=network)

Images go to ``<output_dir>/sample/{output_name}_{label}_{index:02d}_{timestamp}_{seed}.png`` as KS names them
(label ``{step:06d}`` or ``e{epoch:06d}``, timestamp ``%Y%m%d%H%M%S``). Sampling leaves no trace: no grad, every
module's train/eval flag and the global RNG state are restored, so a run with samples trains exactly as one
without.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from library.errors import UserError, closest
from library.validation import evaluation_mode, untouched_rng

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PromptSpec:
    """One sample image. Defaults as KS ``sample_image_inference``; field names are KS's prompt-dict keys."""
    prompt: str
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    sample_steps: int = 30
    scale: float = 7.5                    # classifier-free guidance scale
    seed: int | None = None
    sample_sampler: str | None = None     # per-prompt override of --sample_sampler
    guidance_rescale: float | None = None  # ours (--gr / --cfgr): diffusers' guidance_rescale
    guidance_scale: float | None = None   # KS --g: distilled guidance (Flux); SD families do not use it (as KS)
    index: int = 0                        # position in the file (KS "enum"): names the image


# Line options: letter -> (PromptSpec field, parser). KS train_util.line_to_prompt_dict: n negative prompt, w/h
# size, d seed, s steps, l CFG scale, g guidance scale (Flux's distilled guidance), ss sampler; ours: cfg (= l),
# gr / cfgr (guidance rescale).
LINE_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
    "s": ("sample_steps", int), "l": ("scale", float), "cfg": ("scale", float), "g": ("guidance_scale", float),
    "gr": ("guidance_rescale", float), "cfgr": ("guidance_rescale", float), "ss": ("sample_sampler", str),
}
# KS options for other model families or ControlNet: read by KS, used by none of our families.
IGNORED_KS_OPTIONS = {"cn": "ControlNet image", "ctr": "CFG truncation (Lumina)", "rcfg": "CFG renorm (Lumina)",
                      "fs": "flow shift (Lumina)"}
DICT_KEYS = tuple(f.name for f in fields(PromptSpec) if f.name != "index")


def _finish(values: dict[str, Any], where: str) -> dict[str, Any]:
    """KS clamps: steps to [1, 1000]; sizes are rounded down to a multiple of 64 (at least 64) when sampling."""
    if not str(values.get("prompt", "")).strip():
        raise UserError(f"{where}: the prompt is empty")
    if "sample_steps" in values:
        values["sample_steps"] = max(1, min(1000, int(values["sample_steps"])))
    for key in ("width", "height"):
        if key in values and int(values[key]) < 1:
            raise UserError(f"{where}: {key} {values[key]} must be a positive number of pixels")
    return values


def parse_prompt_line(line: str, where: str = "prompt") -> dict[str, Any]:
    """``a photo of sks --n blurry --w 512 --h 768 --s 28 --d 42 --l 7`` -> KS prompt-dict values.

    The text before the first `` --`` is the prompt; each `` --x value`` sets one option (case-insensitive
    letters: n negative prompt, w width, h height, s steps, d seed, l / cfg CFG scale, g / cfgr guidance rescale,
    ss sampler, g Flux guidance; ours: cfg = l, gr / cfgr guidance rescale). As KS, an unknown option or a bad
    number does not stop the run: that part is skipped, with a printed warning (KS skips it silently)."""
    parts = (" " + line.strip()).split(" --")  # the leading space lets a line start with an option
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, raw = part.strip().partition(" ")
        key, raw = key.lower(), raw.strip()
        if key in IGNORED_KS_OPTIONS:
            print(f"warning: {where}: --{key} ({IGNORED_KS_OPTIONS[key]}) is not used by this trainer; ignored")
            continue
        if key not in LINE_OPTIONS:
            hint = closest(key, LINE_OPTIONS)
            print(f"warning: {where}: unknown option --{key}" + (f" (did you mean --{hint}?)" if hint else "") +
                  "; ignored. Known: " + ", ".join(f"--{k}" for k in LINE_OPTIONS))
            continue
        name, convert = LINE_OPTIONS[key]
        try:
            values[name] = convert(raw)
        except ValueError:
            print(f"warning: {where}: --{key} needs {'an integer' if convert is int else 'a number'}, got '{raw}'; "
                  f"ignored")
    return _finish(values, where)


def _from_dict(entry: Any, where: str) -> dict[str, Any]:
    if isinstance(entry, str):
        return parse_prompt_line(entry, where)
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a prompt line or a table of {', '.join(DICT_KEYS)}; got {entry!r}")
    known = {}
    for key, value in entry.items():
        if key not in DICT_KEYS:
            hint = closest(key, DICT_KEYS)
            print(f"warning: {where}: unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "") + "; ignored")
            continue
        known[key] = value
    return _finish(known, where)


def parse_prompt_file(path: str) -> list[PromptSpec]:
    """Read a KS prompt file: ``.toml`` ([prompt] defaults + [[prompt.subset]] entries), ``.json`` (a list of
    lines or of prompt dicts), anything else as text (one prompt per line; blank lines and lines starting with
    ``#`` are skipped). Errors name the file and the line or entry."""
    flag = f"--sample_prompts {path}"
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts: file '{path}' does not exist")
    try:
        if path.lower().endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
            table = data.get("prompt")
            if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
                raise UserError(f"{flag}: expected a [prompt] table with [[prompt.subset]] entries (KS format)")
            defaults = {k: v for k, v in table.items() if k != "subset"}
            entries = [(f"{flag} [[prompt.subset]] #{i + 1}", {**defaults, **subset})
                       for i, subset in enumerate(table["subset"])]
        elif path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise UserError(f"{flag}: expected a JSON list of prompts (strings or objects)")
            entries = [(f"{flag} entry #{i + 1}", entry) for i, entry in enumerate(data)]
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            entries = [(f"{flag} line {n}", line.strip()) for n, line in enumerate(lines, start=1)
                       if line.strip() and not line.strip().startswith("#")]
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag}: cannot parse it: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag}: not UTF-8 text; save the file as UTF-8") from None
    prompts = [PromptSpec(**_from_dict(entry, where), index=i) for i, (where, entry) in enumerate(entries)]
    if not prompts:
        raise UserError(f"{flag}: no prompts in the file (lines starting with # are comments)")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------------
# KS --sample_sampler names -> (diffusers scheduler class, extra config). KS train_util.get_my_scheduler.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers deprecates first-order "dpmsolver" (still works) and needs sigma_min as its final sigma
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES = tuple(SAMPLERS) + tuple(SAMPLER_ALIASES)


def make_sample_scheduler(name: str, scheduler_config: dict, flow: bool = False) -> Any:
    """A diffusers scheduler for a KS ``--sample_sampler`` name, built from the model's own scheduler config.

    Unlike KS, which builds a fresh scheduler with SD's default betas and forces clip_sample=True, the model's
    config is kept: its betas, prediction type (v-prediction) and zero-terminal-SNR rescale carry over.
    Flow models (SD3) always sample with FlowMatchEulerDiscreteScheduler (its shift from the config): the KS
    names are DDPM solvers that cannot integrate a flow; a name other than euler is logged, not an error."""
    import diffusers

    key = SAMPLER_ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        hint = closest(key, SAMPLER_NAMES)
        raise UserError(f"--sample_sampler: unknown sampler '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                        + f"; choose one of {', '.join(SAMPLER_NAMES)}")
    if flow:
        if key != "euler":
            logger.info("--sample_sampler %s: flow models sample with FlowMatchEulerDiscreteScheduler", name)
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    class_name, overrides = SAMPLERS[key]
    return getattr(diffusers, class_name).from_config(scheduler_config, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
def sample_label(step: int | None = None, epoch: int | None = None) -> str:
    """KS file-name part: ``e{epoch:06d}`` at epoch ends, else ``{step:06d}``."""
    return f"e{epoch:06d}" if epoch is not None else f"{int(step or 0):06d}"


def sample_file_name(output_name: str | None, label: str, index: int, timestamp: str, seed: int) -> str:
    """KS: ``{output_name}_{label}_{index:02d}_{timestamp}_{seed}.png`` (no prefix without an output name)."""
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{label}_{index:02d}_{timestamp}_{seed}.png"


def _pipeline_kwargs(adapter: Any, models: Any, pipe: Any, spec: PromptSpec) -> dict[str, Any]:
    """Family extras (the adapter's pipeline_kwargs, e.g. SD3's trained T5 length) the pipeline accepts."""
    accepted = inspect.signature(pipe.__call__).parameters
    extra: dict[str, Any] = {k: v for k, v in adapter.pipeline_kwargs(models).items() if k in accepted}
    if spec.guidance_scale is not None and not models.extra.get("distilled_guidance"):
        logger.warning("--sample_prompts: --g (distilled guidance) is not used by %s models (as in KS)", adapter.name)
    if spec.guidance_rescale is not None:
        if "guidance_rescale" not in accepted:
            raise UserError(f"--sample_prompts: --gr (guidance rescale) is not supported by the {adapter.name} pipeline")
        extra["guidance_rescale"] = spec.guidance_rescale
    return extra


@contextlib.contextmanager
def _text_model_alias(pipe: Any):
    """diffusers' clip_skip path reads `text_encoder.text_model.final_layer_norm`; transformers 5 dropped the
    `text_model` level. For the time of sampling, point `text_model` at the encoder itself (a plain attribute,
    not a submodule, so no parameter is seen twice)."""
    patched = []
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is not None and "text_model" not in te.__dict__ and not hasattr(te, "text_model") \
                and hasattr(te, "final_layer_norm"):
            object.__setattr__(te, "text_model", te)
            patched.append(te)
    try:
        yield
    finally:
        for te in patched:
            del te.__dict__["text_model"]


def generate_samples(adapter: Any, models: Any, prompts: list[PromptSpec], out_dir: str, label: str,
                     sampler: str = "ddim", seed: int | None = None, *, output_name: str | None = None,
                     network: torch.nn.Module | None = None, timestamp: str | None = None,
                     autocast: Callable[[], Any] = contextlib.nullcontext) -> list[str]:
    """Render ``prompts`` with ``adapter.pipeline(models)`` (LoRA active: it patches the models' forwards) into
    ``out_dir/sample/``; returns the PNG paths in prompt order.

    Seed of prompt i: its ``--d``, else ``seed + i`` (the same image position gets the same noise at every
    sample step, so the images are comparable), else a fresh random seed; the seed used is in the file name.
    Sizes are rounded down to a multiple of 64 (at least 64), as KS. Noise comes from a CPU generator (the same
    image on any device type). Call it on the main process only."""
    folder = os.path.join(out_dir, "sample")
    os.makedirs(folder, exist_ok=True)
    timestamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    flow = getattr(adapter, "kind", "ddpm") == "flow"
    pipe = adapter.pipeline(models)
    pipe.set_progress_bar_config(disable=True)
    modules = [models.denoiser, models.vae, *[m for m in models.text_encoders if m is not None], network]
    paths = []
    with torch.no_grad(), untouched_rng(), evaluation_mode(*modules), _text_model_alias(pipe):
        for spec in prompts:
            pipe.scheduler = make_sample_scheduler(spec.sample_sampler or sampler, models.scheduler_config, flow)
            image_seed = spec.seed if spec.seed is not None else (
                seed + spec.index if seed is not None else int.from_bytes(os.urandom(4), "little"))
            width, height = (max(64, size - size % 64) for size in (spec.width, spec.height))
            with autocast():
                image = pipe(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
                             num_inference_steps=spec.sample_steps, guidance_scale=spec.scale, width=width,
                             height=height, generator=torch.Generator().manual_seed(image_seed),
                             **_pipeline_kwargs(adapter, models, pipe, spec)).images[0]
            path = os.path.join(folder, sample_file_name(output_name, label, spec.index, timestamp, image_seed))
            image.save(path)
            paths.append(path)
    return paths

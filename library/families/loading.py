"""Model loading helpers shared by every family adapter (sd1, sdxl, sd3). Offline only: nothing here downloads.

Stable API (the sdxl / sd3 adapters import these):

    REPO_CONFIG_ROOT                                   configs/models/ of this repository
    resolve_model_source(path, allow_pickle, flag) -> (kind, path)   kind "diffusers" | "single_file"
    load_single_file_state_dict(path, allow_pickle, flag) -> dict[str, Tensor]
    config_dir_for(family_key, model_config) -> str    configs/models/<family_key>, or the --model_config folder
    load_component(cls, root, subfolder, dtype, allow_pickle, flag) -> module   from a diffusers folder
    model_from_config(cls, config_dir, subfolder, state_dict, dtype, what) -> module   build + strict load
    load_tokenizer(cls, root, subfolder, flag) -> tokenizer
    read_scheduler_config(root) -> dict
    alphas_cumprod_from_scheduler_config(config) -> Tensor [T]
    load_vae(path, config_dir, allow_pickle, dtype, flag="--vae") -> AutoencoderKL
    vae_from_single_file_state_dict(state_dict, config_dir, dtype, what) -> AutoencoderKL

Decisions (see docs/models.md):
* A path that exists is a diffusers folder (it has model_index.json or a unet/ or transformer/ subfolder) or a
  single file. `.safetensors` loads with safetensors; `.ckpt/.pt/.pth/.bin` are pickles and are refused unless
  `--allow_pickle`, then read with `torch.load(weights_only=True)` (no arbitrary code runs).
* A string shaped like a hub id (`org/name`) that is not a local path is looked up in the local Hugging Face
  cache only (`local_files_only=True`); absence is a UserError at once, never a download or a hang.
* Single-file checkpoints are converted with diffusers' own `single_file_utils` key converters against the
  architecture in the shipped config folder (or `--model_config`), then loaded strictly: a missing or unexpected
  key is an error that names the flag, not silently random weights.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from library.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO_CONFIG_ROOT = os.path.join(REPO_ROOT, "configs", "models")

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# `org/name` (optionally `org/name@revision` is not supported): the Hugging Face repo id grammar.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DIFFUSERS_MARKERS = ("model_index.json", "unet", "transformer")
_TRIM_AFTER_BYTES = 256 * 2**20   # model_from_config returns freed heap pages after building a model this large


# ----------------------------------------------------------------------------------------------
# Where the weights are
# ----------------------------------------------------------------------------------------------
def _is_diffusers_folder(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in _DIFFUSERS_MARKERS)


def _cached_hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub repo, or None. local_files_only: never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


def resolve_model_source(path: str, allow_pickle: bool = False,
                         flag: str = "--pretrained_model_name_or_path") -> tuple[str, str]:
    """("diffusers" | "single_file", local path) for a model argument.

    Raises UserError for: an empty or missing path, a folder that is not in diffusers layout, a pickle
    checkpoint without --allow_pickle, an unknown file type, a hub id not in the local cache."""
    if not path:
        raise UserError(f"{flag}: no model given; pass a diffusers folder or a single-file .safetensors")
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not _is_diffusers_folder(expanded):
            raise UserError(f"{flag}: folder '{path}' is not a diffusers model (no model_index.json, unet/ or "
                            "transformer/); pass the model's root folder or a single-file .safetensors")
        return "diffusers", expanded
    if os.path.isfile(expanded):
        _check_single_file_suffix(expanded, allow_pickle, flag)
        return "single_file", expanded
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        snapshot = _cached_hub_snapshot(path)
        if snapshot is None:
            raise UserError(f"{flag}: '{path}' is not a local path and hub id '{path}' is not in the local Hugging "
                            "Face cache; this trainer never downloads: run `huggingface-cli download "
                            f"{path}` first or pass a local folder / .safetensors file")
        return "diffusers", snapshot
    raise UserError(f"{flag}: '{path}' does not exist; pass an existing diffusers folder or single-file "
                    ".safetensors checkpoint")


def _check_single_file_suffix(path: str, allow_pickle: bool, flag: str) -> None:
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return
    if lower.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise UserError(f"{flag}: '{path}' is a pickle checkpoint, which can run arbitrary code when loaded; "
                            "convert it to .safetensors, or pass --allow_pickle to load it with "
                            "torch.load(weights_only=True)")
        return
    raise UserError(f"{flag}: '{path}' has an unknown file type; expected .safetensors (or .ckpt/.pt with "
                    "--allow_pickle) or a diffusers folder")


def load_single_file_state_dict(path: str, allow_pickle: bool = False,
                                flag: str = "--pretrained_model_name_or_path",
                                lazy: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint on the CPU.

    lazy=True (.safetensors only): lazy meta tensors that model_from_config reads one at a time
    (library/streamed_load), so the file never sits in memory beside the built models; key converters run on them
    unchanged (their slices and concatenations are replayed on the real bytes); only in-place ops are refused.

    .safetensors: safetensors.torch.load_file. Pickles (.ckpt/.pt/.pth/.bin): only with allow_pickle, through
    torch.load(weights_only=True); Lightning checkpoints nest the weights under 'state_dict' (unwrapped here)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: '{path}' does not exist")
    _check_single_file_suffix(path, allow_pickle, flag)
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            from library import streamed_load

            if lazy and streamed_load.streaming():
                return streamed_load.lazy_safetensors(path)
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise UserError(f"{flag}: '{path}' is not a readable .safetensors file ({err}); re-download or "
                            "re-export it") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends: any failure means "not plain tensors"
        raise UserError(f"{flag}: '{path}' could not be read with torch.load(weights_only=True) ({err}); it "
                        "holds more than tensors: convert it to .safetensors with a trusted tool") from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{flag}: '{path}' does not contain a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def config_dir_for(family_key: str, model_config: str | None = None) -> str:
    """The architecture folder (diffusers layout, configs only) used for single-file loading.

    `model_config` (the --model_config flag) wins over the shipped configs/models/<family_key>."""
    if model_config:
        folder = os.path.expanduser(model_config)
        if not os.path.isdir(folder):
            raise UserError(f"--model_config: '{model_config}' is not a folder; pass a folder in diffusers layout "
                            "(unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/, scheduler/)")
        return folder
    folder = os.path.join(REPO_CONFIG_ROOT, family_key)
    if not os.path.isdir(folder):
        shipped = sorted(os.listdir(REPO_CONFIG_ROOT)) if os.path.isdir(REPO_CONFIG_ROOT) else []
        raise UserError(f"--model_config: no shipped config for '{family_key}' in {REPO_CONFIG_ROOT} (have "
                        f"{shipped}); pass --model_config DIR")
    return folder


# ----------------------------------------------------------------------------------------------
# Building modules
# ----------------------------------------------------------------------------------------------
def _require_file(path: str, flag: str, what: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{flag}: {what} not found at '{path}'; the folder must be in diffusers layout")


def _folder_has_only_pickles(folder: str) -> bool:
    names = os.listdir(folder)
    has_safe = any(n.endswith(SAFETENSORS_SUFFIXES) for n in names)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) for n in names)
    return has_pickle and not has_safe


def load_component(cls: Any, root: str, subfolder: str, dtype: torch.dtype = torch.float32,
                   allow_pickle: bool = False, flag: str = "--pretrained_model_name_or_path") -> Any:
    """`cls.from_pretrained(root/subfolder)` offline, refusing pickle-only weights without --allow_pickle."""
    folder = os.path.join(root, subfolder) if subfolder else root
    _require_file(folder, flag, f"'{subfolder}/'")
    if _folder_has_only_pickles(folder) and not allow_pickle:
        raise UserError(f"{flag}: '{folder}' holds only pickle weights (.bin/.ckpt), which can run arbitrary code; "
                        "convert them to .safetensors or pass --allow_pickle")
    if _is_transformers_class(cls):
        module = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    else:
        module = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    module.eval()
    return module


def _is_transformers_class(cls: Any) -> bool:
    return cls.__module__.startswith("transformers")


def model_from_config(cls: Any, config_dir: str, subfolder: str, state_dict: dict[str, torch.Tensor],
                      dtype: torch.dtype = torch.float32, what: str = "--pretrained_model_name_or_path") -> Any:
    """Build `cls` from config_dir/subfolder/config.json and load `state_dict` (already in diffusers /
    transformers key layout) strictly. A key mismatch means the checkpoint and the architecture disagree."""
    folder = os.path.join(config_dir, subfolder)
    _require_file(os.path.join(folder, "config.json"), "--model_config", f"{subfolder}/config.json")
    # Parameters on the meta device (no memory, no random init); buffers real, so the ones a module computes
    # at construction (Chroma's mod_proj, CLIP's position_ids) exist without being in the file.
    from accelerate import init_empty_weights

    if _is_transformers_class(cls):
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            module = cls(config)
    else:
        config = cls.load_config(folder, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            module = cls.from_config(config)
    expected_shapes = {k: v.shape for k, v in module.state_dict().items()}
    expected = set(expected_shapes)
    # position_ids is rebuilt, never loaded: old A1111-era files carry a float copy with rounding damage.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    got = set(state_dict.keys())
    # transformers registers position_ids as a non-persistent buffer in some versions: tolerate it either way.
    optional = {k for k in expected ^ got if k.endswith("position_ids")}
    missing, unexpected = sorted(expected - got - optional), sorted(got - expected - optional)
    if missing or unexpected:
        raise UserError(f"{what}: the checkpoint's {subfolder} does not match the architecture in '{folder}' "
                        f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
                        f"{unexpected[:3]}); pass --model_config DIR with the matching configs (or --v2 for SD2)")
    for key, value in state_dict.items():
        if key in expected and expected_shapes[key] != value.shape:
            raise UserError(f"{what}: {subfolder} weight '{key}' has shape {tuple(value.shape)} but the architecture "
                            f"in '{folder}' expects {tuple(expected_shapes[key])}; pass the matching --model_config")
    # Cast while loading (single files are often fp16): no module.to(), which would also cast kept-fp32 buffers.
    # One tensor at a time (a lazy tensor is read from the file here), dropping each source entry as it is cast.
    # A tensor under two keys (T5's tied embedding) is read and cast once.
    from library.streamed_load import materialise

    weights, done = {}, {}
    for key in [k for k in state_dict if k in expected]:
        source = state_dict.pop(key)
        if id(source) not in done:
            done[id(source)] = (source, materialise(source, dtype))
        weights[key] = done[id(source)][1]
    del done
    module.load_state_dict(weights, strict=False, assign=True)
    _materialise_buffers(module)
    module.eval()
    # The converters' temporaries (SD3's q/k/v concatenations) left holes in the heap that glibc keeps resident:
    # 0.65 GiB after the bf16 SD3 MMDiT, measured; hand them back before the next model is built (full-size
    # models only: it costs a garbage collection).
    if sum(w.numel() * w.element_size() for w in weights.values()) >= _TRIM_AFTER_BYTES:
        from library.host_memory import trim_heap

        trim_heap()
    return module


def _materialise_buffers(module: torch.nn.Module) -> None:
    """Buffers that are not in the checkpoint (non-persistent ones such as CLIP position_ids) are still on the
    meta device after an assign-load: rebuild them the way their modules do."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    sub._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape)
                else:
                    raise RuntimeError(f"buffer {name} of {type(sub).__name__} left uninitialised")
    for name, param in module.named_parameters():
        if param.is_meta:
            raise RuntimeError(f"parameter {name} left uninitialised")


def load_tokenizer(cls: Any, root: str, subfolder: str = "tokenizer",
                   flag: str = "--pretrained_model_name_or_path") -> Any:
    """A tokenizer from root/subfolder, offline."""
    folder = os.path.join(root, subfolder)
    _require_file(folder, flag, f"tokenizer folder '{subfolder}/'")
    return cls.from_pretrained(folder, local_files_only=True)


# The real CLIP BPE files ship once (configs/models/sd15/tokenizer); SDXL and SD3 configs reuse them.
SHIPPED_CLIP_BPE_DIR = os.path.join(REPO_CONFIG_ROOT, "sd15", "tokenizer")
_CLIP_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "do_lower_case")


def load_clip_tokenizer(root: str, subfolder: str, pad_token: str = "<|endoftext|>",
                        flag: str = "--model_config") -> Any:
    """The CLIP tokenizer in root/subfolder; a folder without BPE files (the shipped SDXL/SD3 configs, or a
    config folder with only tokenizer_config.json) takes the shipped CLIP BPE files, with the special tokens of
    its own tokenizer_config.json when it has one, else `pad_token` (SDXL/SD3 tokenizer_2 pads with "!")."""
    from transformers import CLIPTokenizer

    folder = os.path.join(root, subfolder)
    if any(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "tokenizer.json")):
        return load_tokenizer(CLIPTokenizer, root, subfolder, flag)
    if not os.path.isfile(os.path.join(SHIPPED_CLIP_BPE_DIR, "vocab.json")):
        raise UserError(f"{flag}: no CLIP tokenizer in '{folder}' (vocab.json + merges.txt or tokenizer.json) and "
                        f"none shipped in {SHIPPED_CLIP_BPE_DIR}; give a folder with {subfolder}/")
    special: dict[str, Any] = {"pad_token": pad_token}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            special.update({k: v for k, v in json.load(f).items() if k in _CLIP_SPECIAL_KEYS})
    return CLIPTokenizer.from_pretrained(SHIPPED_CLIP_BPE_DIR, local_files_only=True, **special)


def read_scheduler_config(root: str, flag: str = "--pretrained_model_name_or_path") -> dict:
    """scheduler/scheduler_config.json of a diffusers-layout folder, as a dict."""
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    _require_file(path, flag, "scheduler/scheduler_config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t}(1 − β_s), t = 0..T−1, fp32 (DDPM, Ho et al. 2020 eq. 4).

    scaled_linear (SD): β_t = (linspace(√β_start, √β_end, T))²; linear: linspace(β_start, β_end, T).
    Computed in float64 then cast, as diffusers' DDPMScheduler does in float32 (agreement to 1e-7)."""
    num = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, num, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float64)
    else:
        raise UserError(f"--model_config: scheduler beta_schedule '{schedule}' is not supported "
                        "(use scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# T5 (SD3's text_encoder_3, Flux's text_encoder_2)
# ----------------------------------------------------------------------------------------------
def keep_t5_fp32_modules(t5: Any) -> Any:
    """T5's feed-forward output (`wo`) overflows fp16: keep the modules transformers lists in
    `_keep_in_fp32_modules` in fp32, as its from_pretrained does for a folder."""
    keep = set(type(t5)._keep_in_fp32_modules or ())
    for name, module in t5.named_modules():
        if name.rpartition(".")[2] in keep:
            module.float()
    return t5


def t5_from_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str, subfolder: str,
                       dtype: torch.dtype) -> Any:
    """T5EncoderModel from transformers-layout keys; files (KS t5xxl_fp16.safetensors) store the tied embedding
    once, as `shared.weight`."""
    from transformers import T5EncoderModel

    weights = dict(state_dict)
    if "encoder.embed_tokens.weight" not in weights and "shared.weight" in weights:
        weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
    t5 = model_from_config(T5EncoderModel, config_dir, subfolder, weights, dtype, "--t5xxl")
    return keep_t5_fp32_modules(t5) if dtype == torch.float16 else t5


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------
def _is_diffusers_vae_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state_dict)


def vae_from_single_file_state_dict(state_dict: dict[str, torch.Tensor], config_dir: str,
                                    dtype: torch.dtype = torch.float32,
                                    what: str = "--pretrained_model_name_or_path") -> Any:
    """An AutoencoderKL from a single-file state dict: a whole LDM checkpoint (first_stage_model.* / vae.*), a
    standalone LDM VAE (encoder.down.* ...) or a diffusers-layout VAE file. Architecture: config_dir/vae."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if _is_diffusers_vae_layout(state_dict):
        converted = state_dict
    else:
        vae_config = AutoencoderKL.load_config(os.path.join(config_dir, "vae"), local_files_only=True)
        # Whole-model checkpoints carry other prefixes too; keep only the VAE's before converting.
        if any(k.startswith(("first_stage_model.", "vae.")) for k in state_dict):
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(("first_stage_model.", "vae."))}
        try:
            converted = convert_ldm_vae_checkpoint(state_dict, vae_config)
        except (KeyError, IndexError, ValueError) as err:  # the converter indexes keys the config promises
            raise UserError(f"{what}: the VAE weights do not match the architecture in '{config_dir}/vae' "
                            f"({type(err).__name__}: {err}); pass the matching --model_config") from err
    # LDM VAE files sometimes carry EMA copies / loss weights that the model does not have.
    converted = {k: v for k, v in converted.items() if not k.startswith(("loss.", "model_ema."))}
    return model_from_config(AutoencoderKL, config_dir, "vae", converted, dtype, what)


def load_vae(path: str, config_dir: str, allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
             flag: str = "--vae") -> Any:
    """The --vae override: a diffusers VAE folder (config.json + weights), a model root with vae/, or a single
    file (LDM or diffusers layout) whose architecture comes from config_dir/vae/config.json."""
    from diffusers import AutoencoderKL

    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if os.path.isfile(os.path.join(expanded, "config.json")):
            return load_component(AutoencoderKL, expanded, "", dtype, allow_pickle, flag)
        if os.path.isdir(os.path.join(expanded, "vae")):
            return load_component(AutoencoderKL, expanded, "vae", dtype, allow_pickle, flag)
        raise UserError(f"{flag}: folder '{path}' has neither config.json nor vae/; pass a diffusers VAE folder or "
                        "a .safetensors file")
    if os.path.isfile(expanded):
        state_dict = load_single_file_state_dict(expanded, allow_pickle, flag, lazy=True)  # tensor by tensor
        return vae_from_single_file_state_dict(state_dict, config_dir, dtype, flag)
    kind, resolved = resolve_model_source(path, allow_pickle, flag)  # hub ids in the local cache, or a UserError
    return load_vae(resolved, config_dir, allow_pickle, dtype, flag)

"""`--network_module lycoris.kohya` (LyCORIS's own kohya interface): its network_args checked before any model
loads, and --network_weights loaded without silently skipping modules.

LyCORIS (package lycoris-lora, pinned in requirements.txt) reads its keys with `kwargs.get` and ignores any other,
and reads a boolean as True unless it is the string "False" (lycoris.utils.str_bool). So a typo or `dora_wd=0`
would silently train something else. The keys and their types are those of lycoris/kohya.py `create_network`
(3.4.0; tests/test_networks_lycoris.py checks this list against the installed source); which algorithm takes
which option is LyCORIS's own table (lycoris.config_sdk.ALGO_REGISTRY).
"""
from __future__ import annotations

import os

from library.errors import UserError, closest
from library.families import get_family
from networks.network_args import check_key


def _number(minimum: float | None = None, integer: bool = False):
    def parse(value):
        number = float(value)
        if integer and number != int(number):
            raise ValueError("must be an integer")
        if minimum is not None and number < minimum:
            raise ValueError(f"must be >= {minimum:g}")
        return number
    return parse


def _probability(value):
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError("must be a probability in [0, 1]")
    return p


def _boolean(value):
    if str(value).strip().lower() not in ("true", "false"):
        raise ValueError("must be True or False (LyCORIS reads anything but 'False' as True)")
    return str(value).strip().lower() == "true"


def _factor(value):
    number = _number(integer=True)(value)
    if number != -1 and number < 1:
        raise ValueError("must be -1 (automatic) or a positive integer")
    return number


# key -> parser (ValueError with a reason)
LYCORIS_KEYS = {
    "algo": str, "preset": str,
    "conv_dim": _number(0, True), "conv_alpha": _number(0),
    "dropout": _probability, "rank_dropout": _probability, "module_dropout": _probability,
    "factor": _factor, "block_size": _number(1, True), "constraint": _number(0), "constrain": _number(0),
    "decompose_both": _boolean, "use_tucker": _boolean, "use_cp": _boolean, "use_conv_cp": _boolean,
    "disable_conv_cp": _boolean, "use_scalar": _boolean, "train_norm": _boolean, "rescaled": _boolean,
    "dora_wd": _boolean, "wd_on_output": _boolean, "full_matrix": _boolean, "bypass_mode": _boolean,
    "rs_lora": _boolean, "unbalanced_factorization": _boolean, "train_t5xxl": _boolean,
    "loraplus_lr_ratio": _number(0), "loraplus_unet_lr_ratio": _number(0),
    "loraplus_text_encoder_lr_ratio": _number(0),
}
# network_args key -> the option name in LyCORIS's ALGO_REGISTRY; only keys that some algorithms lack
_ALGO_SPECIFIC = {"factor": "factor", "full_matrix": "full_matrix", "unbalanced_factorization":
                  "unbalanced_factorization", "dora_wd": "weight_decompose", "wd_on_output": "wd_on_output",
                  "constraint": "constraint", "rescaled": "rescaled", "block_size": "block_size"}
_KS_LORA_ONLY = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                 "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "exclude_patterns", "include_patterns")


def validate_network_args(network_args: dict, family: str, network_dim=None, network_alpha=None,
                          network_dropout=None, fp8_base: bool = False, **_ignored) -> dict:
    """Raise UserError on unknown keys, bad values, an unknown algo or preset, or an option the algo ignores."""
    try:
        from lycoris.config import PRESET
        from lycoris.config_sdk import ALGO_REGISTRY
        from lycoris.wrapper import network_module_dict
    except ImportError:
        raise UserError("--network_module lycoris.kohya: LyCORIS is not installed; pip install lycoris-lora "
                        "(the version in requirements.txt)") from None
    if network_dim is not None and (network_dim != int(network_dim) or network_dim < 1):
        raise UserError(f"--network_dim: {network_dim!r} must be a positive integer (LyCORIS's linear dim)")
    if network_alpha is not None and network_alpha < 0:
        raise UserError(f"--network_alpha: {network_alpha!r} must be >= 0")
    if network_dropout is not None:
        raise UserError("--network_dropout is not read by lycoris.kohya; use --network_args dropout=P")
    if fp8_base:
        raise UserError("--fp8_base/--fp8_base_unet with lycoris.kohya: LyCORIS 3.4.0 computes with the frozen weight "
                        "tensor itself, which fp8 storage scales per channel; drop --fp8_base or use networks.lora")
    if get_family(family).lora_file_format != "kohya":
        raise UserError(f"--network_module lycoris.kohya: {family} LoRA files use diffusers keys, which LyCORIS "
                        "does not write; use networks.lora for this family")
    parsed = {}
    for key, raw in network_args.items():
        if key in _KS_LORA_ONLY:
            raise UserError(f"--network_args: '{key}' is a networks.lora option; LyCORIS selects modules with "
                            "preset= (a name or a preset .toml)")
        check_key(key, LYCORIS_KEYS, "lycoris.kohya", note=" (LyCORIS would ignore it)")
        try:
            parsed[key] = LYCORIS_KEYS[key](raw)
        except (TypeError, ValueError) as e:
            raise UserError(f"--network_args: {key}={raw!r} {e or 'is not valid'}") from None

    algo = str(parsed.get("algo", "lora")).lower()
    if algo not in network_module_dict:
        suggestion = closest(algo, network_module_dict)
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        raise UserError(f"--network_args: algo={algo!r} is not a LyCORIS algorithm; {hint}"
                        f"choose one of {', '.join(network_module_dict)}")
    preset = parsed.get("preset")
    if preset is not None and preset not in PRESET and not os.path.isfile(preset):
        raise UserError(f"--network_args: preset={preset!r} is neither a LyCORIS preset ({', '.join(PRESET)}) nor "
                        "an existing preset .toml file")
    spec = ALGO_REGISTRY.get(algo)
    if spec is not None:
        for key, option in _ALGO_SPECIFIC.items():
            if key in parsed and parsed[key] not in (False,) and not spec.supports(option):
                users = [name for name, s in ALGO_REGISTRY.items() if s.supports(option)]
                raise UserError(f"--network_args: {key} does nothing with algo={algo}; it is an option of "
                                f"{', '.join(users)}")
    return parsed


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------
# diffusers paths of the SDXL modules LyCORIS's "full" preset targets by name, and their SAI (KS) paths
_SAI_NAMED_MODULES = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                      "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                      "add_embedding.linear_2": "label_emb.0.2"}


def sai_to_diffusers_names(denoiser) -> dict[str, str]:
    """'lora_unet_<SAI path>' -> 'lora_unet_<diffusers path>' for every module of an SDXL-layout UNet. KS trains
    SDXL on its SAI-layout UNet, so a KS-trained LyCORIS SDXL file names modules by SAI paths; LyCORIS on the
    diffusers UNet names them by diffusers paths (what this trainer writes)."""
    from networks.lora_keys import sdxl_sai_path, unwrap

    unet = unwrap(denoiser)
    mapping = {}
    for path, _ in unet.named_modules():
        try:
            sai = sdxl_sai_path(path, unet.config)
        except (ValueError, IndexError, KeyError, TypeError):
            sai = _SAI_NAMED_MODULES.get(path)
        if sai:
            mapping["lora_unet_" + sai.replace(".", "_")] = "lora_unet_" + path.replace(".", "_")
    return mapping


def load_weights(network, file: str, denoiser) -> dict:
    """--network_weights for a LyCORIS network: LyCORIS's own load (load_state_dict, strict=False), except that a
    key naming no module of this network is an error (LyCORIS would skip it silently and train from scratch), and
    SAI-named SDXL modules (KS-trained files) are renamed to this network's names first."""
    from networks.lora import read_lora_file

    weights, _ = read_lora_file(file)
    own = set(network.state_dict())
    module_of = {key.split(".", 1)[0] for key in own}
    if any(key.split(".", 1)[0] not in module_of for key in weights):
        renamed = sai_to_diffusers_names(denoiser) if hasattr(denoiser, "config") else {}
        weights = {_rename(key, renamed): value for key, value in weights.items()}
    unknown = [key for key in weights if key not in own]
    if unknown:
        raise UserError(f"--network_weights: {len(unknown)} tensors of {file} name no module of this LyCORIS "
                        f"network (e.g. '{unknown[0]}'); use the same algo/preset/dims as the file "
                        "(or --dim_from_weights), and a file for this model family")
    if not weights:
        raise UserError(f"--network_weights: {file} holds no tensors")
    try:
        info = network.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"--network_weights: {file} does not fit this LyCORIS network ({str(e).splitlines()[-1]}); "
                        "use the file's algo/dims/factor, or --dim_from_weights") from None
    return {"missing keys": info.missing_keys} if info.missing_keys else {}


def _rename(key: str, renamed: dict[str, str]) -> str:
    module, _, rest = key.partition(".")
    return f"{renamed.get(module, module)}.{rest}" if rest else key

"""`--network_module lycoris.kohya` (LyCORIS's own kohya interface): its network_args checked before any model
loads, --network_weights loaded without silently skipping modules, and files whose module names are KS's.

LyCORIS (package lycoris-lora, pinned in requirements.txt) reads its keys with `kwargs.get` and ignores any other,
and reads a boolean as True unless it is the string "False" (lycoris.utils.str_bool). So a typo or `dora_wd=0`
would silently train something else. The keys and their types are those of lycoris/kohya.py `create_network`
(3.4.0; tests/test_networks_lycoris.py checks this list against the installed source); which algorithm takes
which option is LyCORIS's own table (lycoris.config_sdk.ALGO_REGISTRY).
"""
from __future__ import annotations

import os

import torch

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


def _check_preset_file(path: str) -> None:
    """Read a preset .toml as LyCORIS will (lycoris.utils.preset.read_preset), before any model loads: it prints
    its reason and returns None for a file it cannot use, which would otherwise surface only after the load."""
    import contextlib
    import io

    from lycoris.utils.preset import read_preset

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            preset = read_preset(path)
        except (AttributeError, TypeError, ValueError) as e:  # a known key with a value of the wrong shape
            preset, said = None, io.StringIO(f"a value has the wrong type: {e}")
    if preset is None:
        reason = " ".join(said.getvalue().split()).removeprefix("Error: ") or "unreadable"
        raise UserError(f"--network_args: preset={path!r} is not a usable LyCORIS preset file ({reason})")


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
    if algo == "full":
        raise UserError("--network_args: algo=full does not run with LyCORIS 3.4.0 (its FullModule deletes the layer's "
                        "weight, then calls the layer's own forward, which needs it, and it refuses bypass_mode); "
                        "use algo=lokr with factor=-1 (near full rank) or algo=locon with a large --network_dim")
    if algo not in network_module_dict:
        suggestion = closest(algo, network_module_dict)
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        raise UserError(f"--network_args: algo={algo!r} is not a LyCORIS algorithm; {hint}"
                        f"choose one of {', '.join(network_module_dict)}")
    preset = parsed.get("preset")
    if preset is not None and preset not in PRESET and not os.path.isfile(preset):
        raise UserError(f"--network_args: preset={preset!r} is neither a LyCORIS preset ({', '.join(PRESET)}) nor "
                        "an existing preset .toml file")
    if preset is not None and preset not in PRESET:
        _check_preset_file(preset)
    spec = ALGO_REGISTRY.get(algo)
    if spec is not None:
        for key, option in _ALGO_SPECIFIC.items():
            if key in parsed and parsed[key] not in (False,) and not spec.supports(option):
                users = [name for name, s in ALGO_REGISTRY.items() if s.supports(option)]
                raise UserError(f"--network_args: {key} does nothing with algo={algo}; it is an option of "
                                f"{', '.join(users)}")
    return parsed


# ---------------------------------------------------------------------------------------------------------
# files: modules named as KS names them
# ---------------------------------------------------------------------------------------------------------
# LyCORIS names a module `<prefix>_<its path in the model it is given>` ('.' -> '_'; lycoris/kohya.py). KS gives it
# other models than we do, so two kinds of names differ:
# * SDXL UNet: KS trains SDXL on its SAI-layout UNet (library/sdxl_original_unet.py), so its files say
#   lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q where ours (diffusers UNet) said
#   lora_unet_down_blocks_1_attentions_0_.... SD1/SD2: KS's UNet (library/original_unet.py) uses diffusers paths.
# * CLIP text encoders: KS (transformers 4) has the `text_model.` level in CLIPTextModel; transformers 5 dropped it
#   there (CLIPTextModelWithProjection keeps it), so LyCORIS here said lora_te1_encoder_layers_0_... where KS and
#   ComfyUI (comfy/lora.py model_lora_keys_clip) say lora_te1_text_model_encoder_layers_0_....
# Files are written with KS's names; --network_weights reads KS's names and our older ones. The network itself
# (and --resume states, which hold its state_dict) keeps LyCORIS's names.
KS_NAMES_ATTRIBUTE = "ks_file_names"  # set on the network by prepare_network: {our module name: KS's name}


def sai_to_diffusers_names(denoiser) -> dict[str, str]:
    """'lora_unet_<SAI path>' -> 'lora_unet_<diffusers path>' for every module of an SDXL-layout UNet that has an
    SAI path (networks.lora_keys.sdxl_sai_path; the top-level modules from library/ldm_convert.UNET_TOP_TO_LDM)."""
    from library.ldm_convert import UNET_TOP_TO_LDM
    from networks.lora_keys import sdxl_sai_path, unwrap

    unet = unwrap(denoiser)
    mapping = {}
    for path, _ in unet.named_modules():
        try:
            sai = sdxl_sai_path(path, unet.config)
        except (ValueError, IndexError, KeyError, TypeError):
            sai = UNET_TOP_TO_LDM.get(path)
        if sai:
            mapping["lora_unet_" + sai.replace(".", "_")] = "lora_unet_" + path.replace(".", "_")
    return mapping


def ks_names_unet_by_sai_path(denoiser) -> bool:
    """True when KS trains this UNet's family in the SAI layout (SDXL): its networks.lora targets carry SAI names."""
    from library.families import detect_family
    from networks.lora_keys import sai_unet_targets, unwrap

    return detect_family(unwrap(denoiser)).lora_unet_targets is sai_unet_targets


def _by_prefix(text_encoders) -> list[tuple[str, object]]:
    """(LyCORIS prefix, encoder): lora_te1, lora_te2, ... for a list, lora_te for one module (lycoris/kohya.py)."""
    if text_encoders is None:
        return []
    if isinstance(text_encoders, (list, tuple)):
        return [(f"lora_te{i + 1}", te) for i, te in enumerate(text_encoders) if te is not None]
    return [("lora_te", text_encoders)]


def ks_module_names(denoiser, text_encoders=None) -> dict[str, str]:
    """LyCORIS's name of a module of these models -> the name KS gives it, for every module whose names differ."""
    from networks.lora_keys import unwrap

    names = {}
    if denoiser is not None and ks_names_unet_by_sai_path(denoiser):
        names.update({ours: sai for sai, ours in sai_to_diffusers_names(denoiser).items()})
    for prefix, te in _by_prefix(text_encoders):
        te = unwrap(te)
        if type(te).__name__.startswith("CLIPTextModel") and not hasattr(te, "text_model"):
            for path, _ in te.named_modules():
                if path:
                    names[f"{prefix}_{path}".replace(".", "_")] = f"{prefix}_text_model_{path}".replace(".", "_")
    return names


def _module_names(keys) -> list[str]:
    return list(dict.fromkeys(key.split(".", 1)[0] for key in keys))


def file_names(network, denoiser, text_encoders=None) -> dict[str, str]:
    """Each module name of this (applied) network -> the name its files carry (KS's). A UNet module of an SDXL
    network without an SAI-layout equal is refused: KS and ComfyUI would not find it."""
    from networks.lora_keys import unwrap

    names = ks_module_names(denoiser, text_encoders)
    sai_layout = denoiser is not None and ks_names_unet_by_sai_path(denoiser)
    out = {}
    for module in _module_names(network.state_dict()):
        if sai_layout and module.startswith("lora_unet_"):
            if module.endswith(("_proj_in", "_proj_out")) and not unwrap(denoiser).config.get("use_linear_projection"):
                raise UserError(f"--network_module lycoris.kohya: {module} is a 1x1 convolution in this SDXL UNet "
                                "(use_linear_projection=False) but a Linear in KS's SDXL UNet, so its tensors would "
                                "not fit KS or ComfyUI; use an SDXL model with linear projections")
            if module not in names:
                raise UserError(f"--network_module lycoris.kohya: {module} has no SAI-layout name (KS's SDXL UNet "
                                "has no such module), so KS and ComfyUI could not load it; use a preset without it")
        out[module] = names.get(module, module)
    return out


def prepare_network(network, denoiser, text_encoders) -> None:
    """After apply_to, before training: the file names of every module (refusing modules KS cannot name)."""
    setattr(network, KS_NAMES_ATTRIBUTE, file_names(network, denoiser, text_encoders))


def save_weights(network, file: str, dtype, metadata: dict | None) -> None:
    """LyCORIS's save_weights (lycoris/kohya.py: dtype cast, its sshs_model_hash, safetensors or a pickle) with each
    module under the name KS gives it (prepare_network); suffixes (lora_up, hada_w1_a, lokr_w1, dora_scale, ...)
    are LyCORIS's."""
    from lycoris.utils import precalculate_safetensors_hashes
    from safetensors.torch import save_file

    names = getattr(network, KS_NAMES_ATTRIBUTE, None) or {}
    tensors = {}
    for key, value in network.state_dict().items():
        module, _, rest = key.partition(".")
        if dtype is not None:
            value = value.detach().clone().to("cpu").to(dtype)
        tensors[f"{names.get(module, module)}.{rest}"] = value
    if os.path.splitext(file)[1] == ".safetensors":
        metadata = dict(metadata or {})
        metadata["sshs_model_hash"] = precalculate_safetensors_hashes(tensors)
        save_file(tensors, file, metadata)
    else:
        torch.save(tensors, file)


def _to_network_names(weights: dict, names: dict[str, str]) -> dict:
    """File keys (KS's names, or this trainer's older LyCORIS names) -> this network's keys."""
    ours = {ks: own for own, ks in names.items()}
    renamed = {}
    for key, value in weights.items():
        module, _, rest = key.partition(".")
        renamed[f"{ours.get(module, module)}.{rest}" if rest else key] = value
    return renamed


def load_weights(network, file: str, denoiser) -> dict:
    """--network_weights for a LyCORIS network: LyCORIS's own load (load_state_dict, strict=False), except that a
    key naming no module of this network is an error (LyCORIS would skip it silently and train from scratch).
    KS's names (SAI paths for SDXL, `text_model_` for CLIP) and our older names (diffusers paths) both load."""
    from networks.lora import read_lora_file

    weights, _ = read_lora_file(file)
    names = getattr(network, KS_NAMES_ATTRIBUTE, None)
    if names is None:
        names = ks_module_names(denoiser) if hasattr(denoiser, "config") else {}
    weights = _to_network_names(weights, names)
    own = set(network.state_dict())
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


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, **kwargs):
    """lycoris.kohya.create_network_from_weights (--dim_from_weights, --base_weights) on a file with KS's names or
    ours: LyCORIS looks modules up by this model's paths, so it would skip every renamed one silently."""
    from lycoris.kohya import create_network_from_weights as lycoris_from_weights
    from networks.lora import read_lora_file

    if weights_sd is None:
        weights_sd, _ = read_lora_file(file, "--base_weights" if kwargs.get("for_inference") else "--network_weights")
    weights_sd = _to_network_names(weights_sd, ks_module_names(unet, text_encoder))
    return lycoris_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# presets on diffusers UNets
# ---------------------------------------------------------------------------------------------------------
# LyCORIS's presets select UNet modules by class name, and `attn-only` names the attention class of KS's own UNets
# (CrossAttention: sd-scripts library/original_unet.py and sdxl_original_unet.py), which diffusers calls Attention
# (diffusers/models/attention_processor.py). So on our UNets attn-only would train no UNet module at all. The other
# class names LyCORIS 3.4.0's presets use (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D) are the
# same in both.
DIFFUSERS_CLASS_NAMES = {"CrossAttention": "Attention"}  # KS's UNet class -> the same module's diffusers class
_TRANSLATED_PRESET = "__lycoris_support_diffusers__"  # the private PRESET entry create_network is pointed at


def preset_for_diffusers(preset: dict) -> dict:
    """A LyCORIS preset dict with each KS UNet class it names also named by its diffusers class (attn-only:
    CrossAttention -> also Attention), so the same modules are trained on a diffusers UNet as on KS's."""
    modules = list(preset.get("unet_target_module", []))
    added = [DIFFUSERS_CLASS_NAMES[m] for m in modules if m in DIFFUSERS_CLASS_NAMES]
    return {**preset, "unet_target_module": modules + [m for m in added if m not in modules]}


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    """lycoris.kohya.create_network with its preset (a built-in name or a .toml) translated for our diffusers UNet
    (preset_for_diffusers). LyCORIS applies the preset it finds in its PRESET table under the given name to its
    network class; the translated one is put there under a private name for the duration of the call."""
    from lycoris import config as lycoris_config
    from lycoris.kohya import create_network as lycoris_create_network
    from lycoris.utils.preset import read_preset

    name = kwargs.get("preset", "full")
    preset = lycoris_config.PRESET.get(name) or read_preset(name)
    if preset is None:
        raise UserError(f"--network_args: preset={name!r} could not be read as a LyCORIS preset .toml")
    lycoris_config.PRESET[_TRANSLATED_PRESET] = preset_for_diffusers(preset)
    try:
        return lycoris_create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                      **{**kwargs, "preset": _TRANSLATED_PRESET})
    finally:
        del lycoris_config.PRESET[_TRANSLATED_PRESET]


# ---------------------------------------------------------------------------------------------------------
# --base_weights: merged as the network's forward computes
# ---------------------------------------------------------------------------------------------------------
def _forward_diff_weight(module, multiplier=1, shape=None, device=None):
    """ΔW of a LoHa or LoKr module as its forward computes it: get_weight(shape) already holds alpha/dim
    (loha: (w1a w1b) ⊙ (w2a w2b) · γ with γ = scale; lokr: make_kron(w1, w2, scale)), times the module's scalar.
    LyCORIS 3.4.0's own get_diff_weight multiplies by scale a second time and drops the scalar, so its merge_to
    adds (alpha/dim)² instead of alpha/dim."""
    diff = module.get_weight(shape) * module.scalar * multiplier
    return (diff if device is None else diff.to(device)), None


def merge_to(network, text_encoders, unet, weights_sd: dict, dtype, device) -> None:
    """--base_weights for a LyCORIS network made by create_network_from_weights: each module merged into its layer
    with the network's multiplier (--base_weights_multiplier) and the delta its forward adds. LyCORIS's kohya
    merge_to merges with multiplier 1 whatever the network's, and double-scales LoHa and LoKr (_forward_diff_weight);
    LoCon, DoRA, OFT/BOFT, GLoRA and norms merge with LyCORIS's own get_merged_weight."""
    import types

    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    def has(prefix: str) -> bool:  # which models the file holds modules of, as LyCORIS's merge_to decides
        return any(key.startswith(prefix) for key in weights_sd)

    modules = ((network.text_encoder_loras if has(network.LORA_PREFIX_TEXT_ENCODER) else [])
               + (network.unet_loras if has(network.LORA_PREFIX_UNET) else []))
    for module in modules:
        if isinstance(module, (LohaModule, LokrModule)):
            module.get_diff_weight = types.MethodType(_forward_diff_weight, module)
        module.merge_to(module.multiplier)

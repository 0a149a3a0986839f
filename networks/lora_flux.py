"""LoRA for Flux.1 and Chroma with kohya sd-scripts' networks/lora_flux.py key names and network_args.

KS trains on the BFL transformer, whose attention projections are fused: ``double_blocks.N.img_attn.qkv`` is one
Linear, ``single_blocks.N.linear1`` is q|k|v|mlp. Our models are diffusers', where the same weights are separate
Linears (library/flux_convert.py has the table). A LoRA module here is one LoRA on one BFL Linear, whatever
number of diffusers Linears make it up:

    ΔW_fused = scale · up · down,  up = [up_q; up_k; up_v (; up_mlp)]  ->  part i adds scale · up_i · down(x)

so the file is exactly KS's (``lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`` [r, in],
``.lora_up.weight`` [3d, r], ``.alpha``), which KS, ComfyUI and diffusers' ``load_lora_weights`` (its KS-Flux
converter splits ``up`` in the same order) read. ``split_qkv=True`` (KS) gives each part its own down and up
(rank r each); the file then holds the block-diagonal merge KS writes: down [k·r, in], up [Σd, k·r], with alpha
k·alpha so that readers' alpha/rank keeps the trained scale (``file_alpha``).

Text encoders: ``lora_te1_`` (CLIP-L, trained unless --network_train_unet_only) and ``lora_te3_`` (T5-XXL, only
with ``train_t5xxl=True``), KS's prefixes. See docs/flux.md and docs/lora-format.md.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from library import flux_convert
from library.errors import UserError
from networks.lora import _param_groups, read_lora_file, LoRANetwork
from networks.lora_keys import _linear_or_conv_in, unwrap
from networks.lora_parts import PartsLoRAModule
from networks.network_api import KSNetworkAPI
from networks.network_args import check_key
from networks.lora_options import check_rank_and_alpha

logger = logging.getLogger(__name__)

PREFIX_CLIP, PREFIX_T5 = "lora_te1", "lora_te3"
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")
TYPE_DIMS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
             "single_dim", "single_mod_dim")
# KS create_modules: the first type whose identifiers all occur in the LoRA name takes the rank
_TYPE_IDENTIFIERS = (("img_attn",), ("txt_attn",), ("img_mlp",), ("txt_mlp",), ("img_mod",), ("txt_mod",),
                     ("single_blocks", "linear"), ("modulation",))
IN_DIM_FILTERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")
TRAIN_BLOCKS = ("all", "single", "double")
NETWORK_ARGS = ("rank_dropout", "module_dropout", "train_blocks", "split_qkv", "train_t5xxl", "verbose",
                "in_dims", "train_double_block_indices", "train_single_block_indices", "network_reg_dims",
                "network_reg_lrs", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
                *TYPE_DIMS)
REFUSED_ARGS = {"ggpo_sigma": "LoRA-GGPO is not built here", "ggpo_beta": "LoRA-GGPO is not built here",
                "conv_dim": "the Flux transformer has no convolutions", "conv_alpha": "the Flux transformer has no "
                "convolutions"}


# =========================================================================================================
# The module
# =========================================================================================================
class FluxLoRAModule(PartsLoRAModule):
    """A LoRA on one KS-named Linear made of ``len(org_modules)`` diffusers Linears (outputs stacked, rows in order;
    networks/lora_parts.py)."""

    cast_to_lora_dtype = True   # an fp32 LoRA on a half model without autocast (CPU)

    def __init__(self, lora_name: str, org_modules: list[torch.nn.Linear], multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, split: bool = False):
        super().__init__(lora_name, org_modules, multiplier, lora_dim, alpha, dropout=dropout,
                         rank_dropout=rank_dropout, module_dropout=module_dropout, split=split)
        self.module_paths: list[str] = []
        self.is_text_encoder = lora_name.startswith("lora_te")

    def delta_scale(self, rank: int) -> float:
        """The file's alpha over the file's rank (what every reader of the file computes)."""
        return float(self.file_alpha()) / rank


# =========================================================================================================
# --network_args
# =========================================================================================================
def _bool(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _int(key: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"--network_args: {key}={value!r} is not an integer") from None
    if number < minimum:
        raise UserError(f"--network_args: {key}={value!r} is below {minimum}")
    return number


def _probability(key: str, value: Any) -> float | None:
    if value is None or str(value).lower() == "none":
        return None
    try:
        p = float(value)
    except ValueError:
        p = -1.0
    if not 0.0 <= p < 1.0:
        raise UserError(f"--network_args: {key}={value!r} is not a probability in [0, 1)")
    return p


def parse_block_selection(key: str, selection: str, total: int) -> list[bool]:
    """KS: 'all', 'none', or indices and ranges '0,1,4-5,7' (0-based) over `total` blocks."""
    selection = str(selection).strip()
    if selection == "all":
        return [True] * total
    if selection in ("none", ""):
        return [False] * total
    chosen = [False] * total
    for part in selection.split(","):
        try:
            if "-" in part:
                start, end = (int(v) for v in part.split("-"))
            else:
                start = end = int(part)
        except ValueError:
            raise UserError(f"--network_args: {key}: '{part}' is not an index or a range like 4-5") from None
        if not (0 <= start <= end < total):
            raise UserError(f"--network_args: {key}: '{part}' is outside 0-{total - 1} (this model has {total} "
                            "blocks)")
        for i in range(start, end + 1):
            chosen[i] = True
    return chosen


def _parse_pairs(key: str, text: str, as_int: bool) -> dict[str, float]:
    """KS network_reg_dims / network_reg_lrs: 'regex=value,regex=value'. Bad entries are errors (KS warns)."""
    pairs: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UserError(f"--network_args: {key}: '{part}' is not pattern=value")
        pattern, value = (s.strip() for s in part.split("=", 1))
        try:
            re.compile(pattern)
            pairs[pattern] = int(value) if as_int else float(value)
        except (re.error, ValueError) as err:
            raise UserError(f"--network_args: {key}: '{part}' ({err})") from None
    return pairs


@dataclass
class FluxNetworkOptions:
    """Typed --network_args of networks.lora_flux (KS names)."""
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_blocks: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    verbose: bool = False
    type_dims: tuple[int | None, ...] | None = None
    in_dims: tuple[int, ...] | None = None
    train_double_block_indices: str | None = None
    train_single_block_indices: str | None = None
    reg_dims: dict[str, float] | None = None
    reg_lrs: dict[str, float] | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    @classmethod
    def parse(cls, kwargs: dict[str, Any]) -> "FluxNetworkOptions":
        for key in kwargs:
            check_key(key, NETWORK_ARGS, "networks.lora_flux", REFUSED_ARGS)
        opts = cls(rank_dropout=_probability("rank_dropout", kwargs.get("rank_dropout")),
                   module_dropout=_probability("module_dropout", kwargs.get("module_dropout")),
                   split_qkv=_bool(kwargs.get("split_qkv", False)), train_t5xxl=_bool(kwargs.get("train_t5xxl", False)),
                   verbose=_bool(kwargs.get("verbose", False)),
                   train_double_block_indices=kwargs.get("train_double_block_indices"),
                   train_single_block_indices=kwargs.get("train_single_block_indices"))
        train_blocks = str(kwargs.get("train_blocks", "all"))
        if train_blocks not in TRAIN_BLOCKS:
            raise UserError(f"--network_args: train_blocks={train_blocks!r}; choose one of {', '.join(TRAIN_BLOCKS)}")
        opts.train_blocks = train_blocks
        if any(k in kwargs for k in TYPE_DIMS):
            opts.type_dims = tuple(None if kwargs.get(k) is None else _int(k, kwargs[k]) for k in TYPE_DIMS)
        if kwargs.get("in_dims") is not None:
            text = str(kwargs["in_dims"]).strip().strip("[]")
            opts.in_dims = tuple(_int("in_dims", v) for v in text.split(","))
            if len(opts.in_dims) != 5:
                raise UserError(f"--network_args: in_dims={kwargs['in_dims']!r} must list 5 ranks (img_in, time_in, "
                                "vector_in, guidance_in, txt_in), e.g. in_dims=[4,2,2,2,4]")
        if kwargs.get("network_reg_dims") is not None:
            opts.reg_dims = _parse_pairs("network_reg_dims", kwargs["network_reg_dims"], as_int=True)
        if kwargs.get("network_reg_lrs") is not None:
            opts.reg_lrs = _parse_pairs("network_reg_lrs", kwargs["network_reg_lrs"], as_int=False)
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if kwargs.get(key) is not None:
                try:
                    value = float(kwargs[key])
                except ValueError:
                    value = -1.0
                if not value > 0:
                    raise UserError(f"--network_args: {key}={kwargs[key]!r} must be a positive number")
                setattr(opts, key, value)
        return opts


# =========================================================================================================
# Targets
# =========================================================================================================
@dataclass
class FluxTarget:
    lora_name: str
    modules: list[torch.nn.Linear]
    paths: list[str]          # diffusers paths inside the transformer / text encoder
    group: str                # "double" | "single" | "in" | "text_encoder"
    component: str            # "transformer" | "clip_l" | "t5xxl"


def transformer_targets(transformer: torch.nn.Module, groups: tuple[str, ...]) -> list[FluxTarget]:
    """The KS-named targets of these BFL groups ('double', 'single', 'in'), on the diffusers modules."""
    transformer = unwrap(transformer)
    layout = flux_convert.layout_of_model(transformer)
    targets = []
    for m in flux_convert.maps_for(layout):
        if m.group in groups:
            modules = [transformer.get_submodule(p) for p in m.diffusers]
            targets.append(FluxTarget(m.lora_name, modules, list(m.diffusers), m.group, "transformer"))
    return targets


def text_encoder_targets(text_encoders: list, train_t5xxl: bool) -> list[FluxTarget]:
    """CLIP-L (lora_te1_, always offered) and T5 (lora_te3_, with train_t5xxl), KS names."""
    targets = []
    for te in text_encoders:
        if te is None:
            continue
        te = unwrap(te)
        is_t5 = type(te).__name__.startswith("T5")
        if is_t5 and not train_t5xxl:
            continue
        prefix = PREFIX_T5 if is_t5 else PREFIX_CLIP
        for path, module in _linear_or_conv_in(te, TEXT_ENCODER_BLOCKS):
            # transformers 5 CLIPTextModel has no `text_model.` level; KS names keep it
            key_path = path if is_t5 or path.startswith("text_model.") else f"text_model.{path}"
            targets.append(FluxTarget(f"{prefix}_{key_path.replace('.', '_')}", [module], [path], "text_encoder",
                                      "t5xxl" if is_t5 else "clip_l"))
    return targets


def _block_index(lora_name: str) -> int:
    return int(lora_name.split("_")[4])   # lora_unet_{double|single}_blocks_N_...


def _rank_for(target: FluxTarget, base: int, opts: FluxNetworkOptions, double_on: list[bool] | None,
              single_on: list[bool] | None) -> int:
    """KS create_modules rank rules: --network_reg_dims first; else the per-type dims, then block selection."""
    name = target.lora_name
    if opts.reg_dims:
        for pattern, dim in opts.reg_dims.items():
            if re.search(pattern, name):
                return int(dim)
    if target.group == "in":
        return base
    dim = base
    if target.group in ("double", "single") and opts.type_dims is not None:
        for identifiers, type_dim in zip(_TYPE_IDENTIFIERS, opts.type_dims):
            if type_dim is not None and all(i in name for i in identifiers):
                dim = type_dim
                break
    if dim and target.group == "double" and double_on is not None and not double_on[_block_index(name)]:
        return 0
    if dim and target.group == "single" and single_on is not None and not single_on[_block_index(name)]:
        return 0
    return dim


# =========================================================================================================
# The network
# =========================================================================================================
class FluxLoRANetwork(KSNetworkAPI, torch.nn.Module):
    """All LoRA modules on a Flux / Chroma transformer (and CLIP-L / T5). Submodules are named by KS names."""

    def __init__(self, text_encoders, transformer, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1.0,
                 dropout: float | None = None, options: FluxNetworkOptions | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None):
        super().__init__()
        opts = options or FluxNetworkOptions()
        self.options, self.multiplier = opts, multiplier
        self.split_qkv, self.train_t5xxl = opts.split_qkv, opts.train_t5xxl
        layout = flux_convert.layout_of_model(unwrap(transformer))
        groups = {"all": ("double", "single"), "single": ("single",), "double": ("double",)}[opts.train_blocks]
        with_in = opts.in_dims is not None and modules_dim is None
        targets = transformer_targets(transformer, groups + (("in",) if with_in or modules_dim else ()))
        encoders = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        te_targets = text_encoder_targets(list(encoders), opts.train_t5xxl or bool(
            modules_dim and any(n.startswith(PREFIX_T5) for n in modules_dim)))
        double_on = single_on = None
        if opts.train_double_block_indices is not None:
            double_on = parse_block_selection("train_double_block_indices", opts.train_double_block_indices,
                                              layout.num_double)
        if opts.train_single_block_indices is not None:
            single_on = parse_block_selection("train_single_block_indices", opts.train_single_block_indices,
                                              layout.num_single)
        in_dim_of = {}
        if with_in:
            in_dim_of = {f: d for f, d in zip(IN_DIM_FILTERS, opts.in_dims)}
        self.text_encoder_loras: list[FluxLoRAModule] = []
        self.unet_loras: list[FluxLoRAModule] = []
        for target in te_targets + targets:
            if modules_dim is not None:
                dim = modules_dim.get(target.lora_name, 0)
                module_alpha = (modules_alpha or {}).get(target.lora_name, dim)
            else:
                base = lora_dim
                if target.group == "in":
                    base = next((d for f, d in in_dim_of.items() if f in target.lora_name), 0)
                dim = _rank_for(target, base, opts, double_on, single_on)
                module_alpha = alpha
            if not dim:
                continue
            lora = FluxLoRAModule(target.lora_name, target.modules, multiplier, dim, module_alpha, dropout=dropout,
                                  rank_dropout=opts.rank_dropout, module_dropout=opts.module_dropout,
                                  split=opts.split_qkv and target.group != "text_encoder")
            lora.module_paths, lora.component = target.paths, target.component
            (self.text_encoder_loras if target.group == "text_encoder" else self.unet_loras).append(lora)
            self.add_module(lora.lora_name, lora)
        if opts.verbose:
            for lora in self.text_encoder_loras + self.unet_loras:
                logger.info("\t%-60s rank %d alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))
        logger.info("Flux LoRA (%s): %d text-encoder modules, %d transformer modules", layout.variant,
                    len(self.text_encoder_loras), len(self.unet_loras))

    # ---- KS training API -------------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
        """KS prepare_optimizer_params_with_multiple_te_lrs: CLIP-L, T5 and transformer groups (--text_encoder_lr
        one value for both encoders, or two), LoRA+ up groups, and one group per --network_reg_lrs pattern."""
        self.requires_grad_(True)
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
            te_lrs = [default_lr, default_lr]
        elif isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = [float(text_encoder_lr[0]), float(text_encoder_lr[-1])]
        else:
            te_lrs = [float(text_encoder_lr)] * 2
        te_ratio = self.options.loraplus_text_encoder_lr_ratio or self.options.loraplus_lr_ratio
        unet_ratio = self.options.loraplus_unet_lr_ratio or self.options.loraplus_lr_ratio
        parts = [([l for l in self.text_encoder_loras if l.component == "clip_l"], te_lrs[0], te_ratio),
                 ([l for l in self.text_encoder_loras if l.component == "t5xxl"], te_lrs[1], te_ratio),
                 (self.unet_loras, unet_lr if unet_lr is not None else default_lr, unet_ratio)]
        groups: list[dict] = []
        for loras, lr, ratio in parts:
            by_lr: dict[Any, list[FluxLoRAModule]] = {}
            for lora in loras:
                by_lr.setdefault(self._reg_lr(lora.lora_name, lr), []).append(lora)
            for group_lr, members in by_lr.items():
                groups += _param_groups(members, group_lr, ratio)
        return groups

    def _reg_lr(self, lora_name: str, lr):
        for pattern, reg_lr in (self.options.reg_lrs or {}).items():
            if re.search(pattern, lora_name):
                return reg_lr
        return lr

    # ---- files ------------------------------------------------------------------------------------------
    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """KS keys: '<lora_name>.lora_down.weight' / '.lora_up.weight' / '.alpha' (split parts merged)."""
        tensors = {}
        for lora in self.text_encoder_loras + self.unet_loras:
            down, up = lora.fused_weights()
            tensors[f"{lora.lora_name}.lora_down.weight"] = down
            tensors[f"{lora.lora_name}.lora_up.weight"] = up
            tensors[f"{lora.lora_name}.alpha"] = lora.file_alpha()
        return {k: v.to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in tensors.items()}

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Write the LoRA file atomically, with KS's sshs hashes in the metadata."""
        LoRANetwork.save_weights(self, file, dtype, metadata)

    def internal_state_dict(self, weights_sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """File keys -> this network's state_dict keys (fused files into split modules: KS's block split),
        and the keys that name no module."""
        internal, unknown = {}, []
        for key, value in weights_sd.items():
            name, _, param = key.partition(".")
            lora = getattr(self, name, None) if name.startswith("lora_") else None
            if not isinstance(lora, FluxLoRAModule) or param not in ("lora_down.weight", "lora_up.weight", "alpha"):
                unknown.append(key)
                continue
            k, r = len(lora.out_dims), lora.lora_dim
            if not lora.split or param == "alpha":
                internal[key] = value / k if lora.split else value   # the file's alpha is k·alpha (file_alpha)
                continue
            if param == "lora_down.weight":
                if value.shape[0] != k * r:
                    raise UserError(f"--network_weights: {key} has rank {value.shape[0]}, split_qkv needs {k}×{r}; "
                                    "drop split_qkv=True or use the file's --network_dim")
                for i, part in enumerate(value.chunk(k, dim=0)):
                    internal[f"{name}.lora_down.{i}.weight"] = part
            else:
                blocks = [value[lora.rows[i], i * r:(i + 1) * r] for i in range(k)]
                if not torch.equal(torch.block_diag(*blocks).to(value), value):
                    raise UserError(f"--network_weights: {key} is not block-diagonal, so it was not trained with "
                                    "split_qkv=True; drop split_qkv=True to load it")
                for i, block in enumerate(blocks):
                    internal[f"{name}.lora_up.{i}.weight"] = block
        return internal, unknown

    def load_weights(self, file: str):
        """Load a KS-format Flux LoRA; returns torch's (missing_keys, unexpected_keys)."""
        weights_sd, _ = read_lora_file(file)
        internal, unknown = self.internal_state_dict(weights_sd)
        if weights_sd and not internal:
            raise UserError(f"--network_weights: none of the {len(weights_sd)} keys of {file} names a LoRA module "
                            f"of this model (first key: '{next(iter(weights_sd))}'); is it a Flux LoRA in KS format?")
        return self.load_mapped_weights(internal, unknown, file,
                                        "use --dim_from_weights (or the file's ranks)", warn=False)

    @torch.no_grad()
    def merge_to(self, text_encoders=None, transformer=None, weights_sd: dict | None = None, dtype=None,
                 device=None) -> None:
        """W ← W + multiplier·ΔW in the diffusers modules (ΔW split by rows), then unhook."""
        if weights_sd is not None:
            internal, _ = self.internal_state_dict(weights_sd)
            self.load_state_dict(internal, strict=False)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.merge_to_org()


# =========================================================================================================
# KS entry points
# =========================================================================================================
FLUX_TRANSFORMERS = ("FluxTransformer2DModel", "ChromaTransformer2DModel")


def validate_network_args(network_args: dict, family: str, network_dim=None, network_alpha=None,
                          network_dropout=None, scale_weight_norms=None, **_ignored) -> FluxNetworkOptions:
    """--network_args, --network_dim / --network_alpha / --network_dropout, before any model loads
    (networks/network_args.py calls it). Block indices are checked against the model once it is loaded."""
    check_rank_and_alpha(network_dim, network_alpha, network_dropout)
    return FluxNetworkOptions.parse(network_args)


def _check_transformer(flux) -> None:
    if type(unwrap(flux)).__name__ not in FLUX_TRANSFORMERS:
        raise UserError(f"--network_module networks.lora_flux: is for Flux.1 / Chroma (flux_train_network.py), not "
                        f"a {type(unwrap(flux)).__name__}; use networks.lora")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   flux, neuron_dropout: float | None = None, **kwargs) -> FluxLoRANetwork:
    """KS create_network: network_dim None -> 4, network_alpha None -> 1.0; kwargs are --network_args."""
    _check_transformer(flux)
    dim, alpha, neuron_dropout = check_rank_and_alpha(network_dim, network_alpha, neuron_dropout)
    return FluxLoRANetwork(text_encoders, flux, multiplier, dim, alpha, neuron_dropout,
                           FluxNetworkOptions.parse(kwargs))


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoders, flux,
                                weights_sd: dict | None = None, for_inference: bool = False,
                                neuron_dropout: float | None = None, **kwargs) -> tuple[FluxLoRANetwork, dict]:
    """KS create_network_from_weights: one module per module in the file with its rank and alpha (fused; a
    split_qkv file loads as one rank-k·r LoRA, the same ΔW). Returns (network, weights)."""
    _check_transformer(flux)
    if weights_sd is None:
        weights_sd, _ = read_lora_file(file)
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, param = key.partition(".")
        if param == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
        elif param == "alpha":
            modules_alpha[name] = float(value.float())
    options = FluxNetworkOptions.parse({k: v for k, v in kwargs.items() if k != "split_qkv"})
    network = FluxLoRANetwork(text_encoders, flux, multiplier, dropout=check_rank_and_alpha(None, None,
                                                                                           neuron_dropout)[2],
                              options=options, modules_dim=modules_dim, modules_alpha=modules_alpha)
    missing = sorted(set(modules_dim) - {l.lora_name for l in network.text_encoder_loras + network.unet_loras})
    if missing:
        raise UserError(f"--network_weights: {len(missing)} modules of {file} do not exist in this model (e.g. "
                        f"{missing[:3]}); is the file for another Flux variant or size?")
    return network, network.internal_state_dict(weights_sd)[0]

"""KS `networks.lora_sd3` on our diffusers SD3Transformer2DModel: KS's key names, targets and network_args.

KS (sd-scripts networks/lora_sd3.py) trains SD3 on SAI's MMDiT (library/sd3_models.py) and names a module
``lora_unet_<SAI path, '.' -> '_'>``: every Linear inside a SingleDiTBlock, i.e. per joint block N and stream
S ∈ {context_block, x_block}: ``attn_qkv`` (fused q,k,v), ``attn_proj``, ``attn2_qkv`` / ``attn2_proj`` (SD3.5
MMDiT-X dual-attention blocks), ``mlp_fc1``, ``mlp_fc2``, ``adaLN_modulation_1``; with ``emb_dims`` also
``context_embedder``, ``t_embedder_mlp_{0,2}``, ``x_embedder_proj`` (the patch conv), ``y_embedder_mlp_{0,2}``,
``final_layer_adaLN_modulation_1``, ``final_layer_linear``. Text encoders: ``lora_te1_`` (CLIP-L), ``lora_te2_``
(CLIP-G), ``lora_te3_`` (T5-XXL, with ``train_t5xxl=True``) + the transformers path (CLIPAttention / CLIPMLP,
T5Attention / T5DenseGatedActDense linears).

diffusers splits SAI's fused qkv into to_q / to_k / to_v (add_{q,k,v}_proj for the context stream). A KS qkv LoRA
is ΔW_qkv = s·U·D with D [r, in] and U [3d, r]; rows of W_qkv are q; k; v, so ΔW_q = s·U[0:d]·D, ΔW_k = s·U[d:2d]·D,
ΔW_v = s·U[2d:3d]·D: one module here holds D and U and adds U[rows]·D x to each of the three projections. The
adaLN of the final layer and of the last (pre-only) context block store (shift, scale) in SAI and (scale, shift)
in diffusers, so their U rows are swapped halves (library/sd3_convert.py, the exact inverse of diffusers'
converter). The network's state_dict is therefore KS's file layout, key for key.

Files: `--lora_format kohya` writes that layout (KS, ComfyUI read it); `peft` (the default, what diffusers and
ComfyUI both read) writes ``transformer.<diffusers path>.lora_A/B`` per diffusers module, B = s·U[rows]
(docs/lora-format.md). Both load back with --network_weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from library.errors import UserError
from library.families import get_family
from library.sd3_convert import _BLOCK, _QKV, _TOP
from networks.lora import _param_groups, _per_text_encoder, read_lora_file, LoRANetwork
from networks.lora_keys import _linear_or_conv_in, text_encoder_list, unwrap
from networks.lora_parts import PartsLoRAModule
from networks.network_api import KSNetworkAPI
from networks.network_args import check_key
from networks.lora_options import _bool, _block_selection, _non_negative_int, _positive_float, _probability, \
    check_rank_and_alpha

logger = logging.getLogger(__name__)

LORA_PREFIX_SD3 = "lora_unet"
TE_PREFIXES = ("lora_te1", "lora_te2", "lora_te3")               # CLIP-L, CLIP-G, T5-XXL
TE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention",
                                      "T5DenseGatedActDense")
# A SingleDiTBlock's Linear layers in KS's named_modules order (SAI paths under joint_blocks.N.<stream>.)
_STREAM_MODULES = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
_STREAMS = ("context_block", "x_block")
# KS type_dims order and the name parts that select them
TYPE_DIM_KEYS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
_TYPE_IDS = (("context_block", "attn"), ("context_block", "mlp"), ("context_block", "adaLN_modulation"),
             ("x_block", "attn"), ("x_block", "mlp"), ("x_block", "adaLN_modulation"))
# KS emb_dims order: the name filter of each entry (KS: "_t_embedder" so that context_embedder does not match)
EMB_FILTERS = ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
               "final_layer_linear")
FILE_FORMATS = ("peft", "kohya")
DEFAULT_FILE_FORMAT = "peft"
_SAI_TO_DIFFUSERS_TOP = {sai: diffusers for diffusers, sai in _TOP.items()}
_SAI_TO_DIFFUSERS_BLOCK = {sai: diffusers for diffusers, sai in _BLOCK.items()}


# =========================================================================================================
# network_args
# =========================================================================================================
@dataclass
class SD3LoraOptions:
    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    type_dims: list[int | None] | None = None     # KS [context_attn, context_mlp, context_mod, x_attn, x_mlp, x_mod]
    emb_dims: list[int] | None = None             # KS [context, t, x, y, final_mod, final_linear]
    train_block_indices: list[int] | None = None  # selected joint blocks
    train_t5xxl: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False


def _emb_dims(value) -> list[int]:
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    dims = [_non_negative_int(d) for d in text.split(",")]
    if len(dims) != 6:
        raise ValueError(f"must be 6 ranks (context, t, x, y, final_mod, final_linear), got {len(dims)}")
    return dims


def _split_qkv(value) -> bool:
    if _bool(value):
        raise ValueError("is not built here (KS trains q, k, v as three rank-r parts of one module and saves them "
                         "merged; the fused module trains the same targets); drop it")
    return False


_KEYS = {
    **{key: (_non_negative_int, f"{key}=8 (0 leaves those modules out)") for key in TYPE_DIM_KEYS},
    "emb_dims": (_emb_dims, "emb_dims=[4,0,0,4,0,0]"),
    "train_block_indices": (_block_selection, "train_block_indices=0-5,10"),
    "rank_dropout": (_probability, "rank_dropout=0.1"),
    "module_dropout": (_probability, "module_dropout=0.1"),
    "split_qkv": (_split_qkv, "split_qkv=False"),
    "train_t5xxl": (_bool, "train_t5xxl=True"),
    "verbose": (_bool, "verbose=True"),
    "loraplus_lr_ratio": (_positive_float, "loraplus_lr_ratio=16"),
    "loraplus_unet_lr_ratio": (_positive_float, "loraplus_unet_lr_ratio=16"),
    "loraplus_text_encoder_lr_ratio": (_positive_float, "loraplus_text_encoder_lr_ratio=4"),
}
_REFUSED = {
    "conv_dim": "SD3's MMDiT has no conv layer inside its blocks (KS ignores it); the patch conv is emb_dims' 3rd entry",
    "conv_alpha": "SD3's MMDiT has no conv layer inside its blocks (KS ignores it)",
}


def _sd3_family():
    from library.families import sd3

    return sd3.FAMILY


def validate_network_args(network_args: dict, family: str, network_dim=None, network_alpha=None,
                          network_dropout=None, **_ignored) -> SD3LoraOptions:
    """KS networks.lora_sd3 network_args -> SD3LoraOptions; every mistake is a UserError naming the key."""
    if get_family(family) is not _sd3_family():
        raise UserError(f"--network_module networks.lora_sd3: builds LoRA for the SD3 MMDiT, not {family}; use "
                        "networks.lora")
    dim, alpha, dropout = check_rank_and_alpha(network_dim, network_alpha, network_dropout)
    o = SD3LoraOptions(dim=dim, alpha=alpha, dropout=dropout)
    type_dims: list[int | None] = [None] * 6
    for key, raw in network_args.items():
        check_key(key, _KEYS, "networks.lora_sd3", _REFUSED)
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
            continue
        parse, example = _KEYS[key]
        try:
            value = parse(raw)
        except (TypeError, ValueError) as e:
            raise UserError(f"--network_args: {key}={raw!r} {e or 'is not valid'}; e.g. {example}") from None
        if key in TYPE_DIM_KEYS:
            type_dims[TYPE_DIM_KEYS.index(key)] = value
        elif key != "split_qkv":
            setattr(o, key, value)
    if any(d is not None for d in type_dims):
        o.type_dims = type_dims
    return o


# =========================================================================================================
# Targets
# =========================================================================================================
@dataclass(frozen=True, eq=False)
class Part:
    """One diffusers module a KS module covers, and which rows of the KS up weight it gets (None: all)."""
    path: str                      # path inside the component
    module: torch.nn.Module
    rows: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class SD3Target:
    lora_name: str                 # KS name
    component: str                 # 'transformer' | 'text_encoder' | 'text_encoder_2' | 'text_encoder_3'
    parts: tuple[Part, ...]
    emb_index: int | None = None   # index into emb_dims (None: a block or text-encoder module)

    @property
    def is_text_encoder(self) -> bool:
        return self.component != "transformer"


def _swapped_halves(n: int) -> torch.Tensor:
    """Row i of the diffusers weight is row rows[i] of the SAI weight ((shift, scale) <-> (scale, shift))."""
    half = n // 2
    return torch.cat([torch.arange(half, n), torch.arange(0, half)])


def _get(root: torch.nn.Module, path: str):
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else None


def mmdit_targets(transformer: torch.nn.Module) -> list[SD3Target]:
    """Every module KS's lora_sd3 can target in an SD3 / SD3.5 MMDiT (blocks, then the emb_dims modules), with the
    diffusers modules that hold its weight."""
    transformer = unwrap(transformer)
    targets: list[SD3Target] = []
    num_layers = len(transformer.transformer_blocks)
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        for stream in _STREAMS:
            for module in _STREAM_MODULES:
                sai = f"{stream}.{module}"
                name = f"{LORA_PREFIX_SD3}_joint_blocks_{i}_{sai.replace('.', '_')}"
                if sai in _QKV:
                    found = [(block + p, _get(transformer, block + p)) for p in _QKV[sai]]
                    if any(m is None for _, m in found):
                        continue
                    width = found[0][1].out_features
                    parts = tuple(Part(path, m, torch.arange(k * width, (k + 1) * width))
                                  for k, (path, m) in enumerate(found))
                elif sai in _SAI_TO_DIFFUSERS_BLOCK:
                    path = block + _SAI_TO_DIFFUSERS_BLOCK[sai]
                    m = _get(transformer, path)
                    if m is None:
                        continue
                    # the last block's context stream is pre-only: its adaLN is stored (shift, scale) in SAI
                    swap = i == num_layers - 1 and sai == "context_block.adaLN_modulation.1"
                    parts = (Part(path, m, _swapped_halves(m.out_features) if swap else None),)
                else:
                    continue   # no such module in SAI's MMDiT (the context stream has no attn2)
                targets.append(SD3Target(name, "transformer", parts))
    for sai, path in _SAI_TO_DIFFUSERS_TOP.items():
        m = _get(transformer, path)
        if m is None:
            continue
        name = f"{LORA_PREFIX_SD3}_{sai.replace('.', '_')}"
        index = next(k for k, f in enumerate(EMB_FILTERS) if f in name)
        rows = _swapped_halves(m.out_features) if sai == "final_layer.adaLN_modulation.1" else None
        targets.append(SD3Target(name, "transformer", (Part(path, m, rows),), emb_index=index))
    return targets


def text_encoder_targets(text_encoders: list, train_t5xxl: bool) -> list[SD3Target]:
    """KS: CLIP-L -> lora_te1_, CLIP-G -> lora_te2_, T5-XXL -> lora_te3_ (only with train_t5xxl), each followed by the
    transformers module path ('text_model.' kept for CLIP even where transformers 5 flattened it)."""
    targets = []
    for index, te in enumerate(text_encoder_list(text_encoders)[:3]):
        if te is None or (index == 2 and not train_t5xxl):
            continue
        te = unwrap(te)
        for path, module in _linear_or_conv_in(te, TEXT_ENCODER_TARGET_REPLACE_MODULE):
            key_path = path if index == 2 or path.startswith("text_model.") else f"text_model.{path}"
            targets.append(SD3Target(f"{TE_PREFIXES[index]}_{key_path.replace('.', '_')}", TE_COMPONENTS[index],
                                     (Part(path, module, None),)))
    return targets


def _peft_name(target: SD3Target, part: Part) -> str:
    path = part.path
    if target.component in ("text_encoder", "text_encoder_2") and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{target.component}.{path}"


# =========================================================================================================
# The module
# =========================================================================================================
class SD3LoRAModule(PartsLoRAModule):
    """One KS LoRA module over one or more diffusers modules (fused qkv: three; networks/lora_parts.py). lora_down
    [r, in] (a conv with the org kernel for the patch conv), lora_up [Σ out, r]; each part adds
    multiplier·scale·U[rows]·D x to its org output, rows from the target (swapped halves for SAI's adaLN)."""

    def __init__(self, target: SD3Target, multiplier: float, lora_dim: int, alpha: float | None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__(target.lora_name, [p.module for p in target.parts], multiplier, lora_dim, alpha,
                         dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                         rows=[p.rows for p in target.parts])
        self.component = target.component
        self.target = target


# =========================================================================================================
# The network
# =========================================================================================================
class SD3LoRANetwork(KSNetworkAPI, torch.nn.Module):
    """KS networks.lora_sd3 LoRANetwork on diffusers modules. Submodules carry KS names, so state_dict() is KS's
    file layout ('<lora_name>.lora_down.weight' / '.lora_up.weight' / '.alpha')."""

    LORA_PREFIX_SD3 = LORA_PREFIX_SD3
    LORA_PREFIX_TEXT_ENCODER_CLIP_L, LORA_PREFIX_TEXT_ENCODER_CLIP_G, LORA_PREFIX_TEXT_ENCODER_T5 = TE_PREFIXES

    def __init__(self, text_encoders, mmdit, multiplier: float = 1.0, options: SD3LoraOptions | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None):
        super().__init__()
        o = options or SD3LoraOptions()
        self.options = o
        self.multiplier = multiplier
        self.file_format = DEFAULT_FILE_FORMAT
        self.loraplus_lr_ratio = o.loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = o.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = o.loraplus_text_encoder_lr_ratio
        train_t5xxl = o.train_t5xxl or any(n.startswith(TE_PREFIXES[2]) for n in (modules_dim or {}))
        num_blocks = len(unwrap(mmdit).transformer_blocks)
        if o.train_block_indices is not None and len(o.train_block_indices) < 10_000 \
                and max(o.train_block_indices, default=-1) >= num_blocks:   # 10 000 entries: 'all'
            raise UserError(f"--network_args: train_block_indices names block {max(o.train_block_indices)}, but this "
                            f"MMDiT has {num_blocks} joint blocks (0-{num_blocks - 1})")
        self.targets = text_encoder_targets(text_encoders, train_t5xxl) + mmdit_targets(mmdit)
        self.text_encoder_loras: list[SD3LoRAModule] = []
        self.unet_loras: list[SD3LoRAModule] = []
        for target in self.targets:
            if modules_dim is not None:
                dim = modules_dim.get(target.lora_name)
                alpha = (modules_alpha or {}).get(target.lora_name, dim)
            else:
                dim, alpha = self._dim_of(target, o), o.alpha
            if not dim:
                continue
            lora = SD3LoRAModule(target, multiplier, dim, alpha, dropout=o.dropout, rank_dropout=o.rank_dropout,
                                 module_dropout=o.module_dropout)
            (self.text_encoder_loras if target.is_text_encoder else self.unet_loras).append(lora)
            self.add_module(lora.lora_name, lora)
        self._targets_by_name = {t.lora_name: t for t in self.targets}
        logger.info("LoRA (networks.lora_sd3): %d text encoder modules, %d MMDiT modules",
                    len(self.text_encoder_loras), len(self.unet_loras))
        if o.verbose:
            for lora in self.unet_loras:
                logger.info("\t%-50s %d, %s", lora.lora_name, lora.lora_dim, float(lora.alpha))

    @staticmethod
    def _dim_of(target: SD3Target, o: SD3LoraOptions) -> int | None:
        """KS create_modules: the network rank; type_dims by (stream, kind); 0 outside train_block_indices;
        emb_dims for the embedders and the final layer (none without emb_dims)."""
        name = target.lora_name
        if target.emb_index is not None:
            return o.emb_dims[target.emb_index] if o.emb_dims else None
        dim = o.dim
        if target.is_text_encoder:
            return dim
        if o.type_dims is not None:
            for d, ids in zip(o.type_dims, _TYPE_IDS):
                if d is not None and all(part in name for part in ids):
                    dim = d
                    break
        if dim and o.train_block_indices is not None:
            block_index = int(name.split("_")[4])   # lora_unet_joint_blocks_N_...
            if block_index not in o.train_block_indices:
                dim = 0
        return dim

    # ---- KS training API --------------------------------------------------------------------------------
    def set_file_format(self, file_format: str | None) -> None:
        """--lora_format peft | kohya (None: keep the default, peft)."""
        if file_format is None:
            return
        if file_format not in FILE_FORMATS:
            raise UserError(f"--lora_format: '{file_format}' is not one of {', '.join(FILE_FORMATS)}")
        if file_format == "peft" and any(l.component == TE_COMPONENTS[2] for l in self.text_encoder_loras):
            raise UserError("--lora_format peft: diffusers' SD3 LoRA loader reads no T5 (text_encoder_3) modules, so "
                            "a train_t5xxl=True network cannot be written as PEFT keys; use --lora_format kohya "
                            "(KS, ComfyUI) or drop train_t5xxl")
        self.file_format = file_format

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
        """KS prepare_optimizer_params_with_multiple_te_lrs: one group per text encoder (CLIP-L, CLIP-G, T5; a
        list of lrs gives one each, a shorter list repeats its last), one for the MMDiT; LoRA+ splits lora_up."""
        self.requires_grad_(True)
        te_lrs = _per_text_encoder(text_encoder_lr, default_lr)
        groups: list[dict] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for i, component in enumerate(TE_COMPONENTS):
            loras = [lora for lora in self.text_encoder_loras if lora.component == component]
            groups += _param_groups(loras, te_lrs[min(i, len(te_lrs) - 1)], te_ratio)
        lr = unet_lr if unet_lr is not None else default_lr
        return groups + _param_groups(self.unet_loras, lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """KS max-norm on each KS module's ΔW (the fused one for qkv)."""
        return LoRANetwork.apply_max_norm_regularization(self, max_norm_value, device)

    # ---- files ------------------------------------------------------------------------------------------
    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """kohya: KS's layout (the state_dict); peft: 'transformer.<path>.lora_A.weight' = D and '.lora_B.weight' =
        scale·U[rows] per diffusers module (PEFT has no alpha: the scale is baked into B)."""
        tensors = {}
        for lora in self.text_encoder_loras + self.unet_loras:
            down = lora.lora_down.weight.detach()
            if self.file_format == "kohya":
                tensors[f"{lora.lora_name}.lora_down.weight"] = down
                tensors[f"{lora.lora_name}.lora_up.weight"] = lora.lora_up.weight.detach()
                tensors[f"{lora.lora_name}.alpha"] = lora.alpha.detach()
                continue
            for index, part in enumerate(lora.target.parts):
                name = _peft_name(lora.target, part)
                tensors[f"{name}.lora_A.weight"] = down.clone()   # one tensor per key (safetensors)
                tensors[f"{name}.lora_B.weight"] = lora.up_weight(index).detach().float() * lora.scale
        return {k: v.to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in tensors.items()}

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        LoRANetwork.save_weights(self, file, dtype, metadata)

    def load_weights(self, file: str):
        weights_sd, _ = read_lora_file(file)
        return self.load_file_state_dict(weights_sd, source=file)

    def load_file_state_dict(self, weights_sd: dict[str, torch.Tensor], source: str = "state dict"):
        """KS keys or our PEFT keys -> the network; returns (missing, unexpected) like torch, keys naming no module
        of this network counted as unexpected."""
        internal, unknown = to_ks_state_dict(weights_sd, self.targets, self._alpha_of)
        if weights_sd and not internal:
            raise UserError(f"--network_weights: none of the {len(weights_sd)} keys of {source} names a "
                            f"networks.lora_sd3 module of this model (first key: '{next(iter(weights_sd))}')")
        return self.load_mapped_weights(internal, unknown, source,
                                        "use --dim_from_weights (or the file's --network_dim / network_args)")

    def _alpha_of(self, lora_name: str, rank: int) -> float:
        module = getattr(self, lora_name, None)
        return float(module.alpha) if module is not None else float(rank)

    @torch.no_grad()
    def merge_to(self, text_encoders=None, mmdit=None, weights_sd: dict | None = None, dtype=None, device=None):
        """W ← W + multiplier·ΔW per diffusers module, then unhook."""
        if weights_sd is not None:
            self.load_file_state_dict(weights_sd)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.merge_to_org()


def to_ks_state_dict(file_sd: dict[str, torch.Tensor], targets: list[SD3Target], alpha_of) \
        -> tuple[dict[str, torch.Tensor], list[str]]:
    """File tensors (KS keys, or PEFT keys per diffusers module) -> the network's KS-keyed state dict, unknown keys.

    PEFT parts of one KS module must share lora_A (as our peft files do); their B's are placed in their rows of U
    and rescaled by rank/alpha (the receiving module multiplies by alpha/rank)."""
    by_name = {t.lora_name: t for t in targets}
    by_peft: dict[str, tuple[SD3Target, int]] = {}
    for t in targets:
        for index, part in enumerate(t.parts):
            by_peft[_peft_name(t, part)] = (t, index)
    internal: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    peft_down: dict[str, torch.Tensor] = {}
    peft_up: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in file_sd.items():
        base, _, suffix = key.partition(".")
        if base in by_name and suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            internal[key] = value
            continue
        for peft_suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(peft_suffix) and key[: -len(peft_suffix)] in by_peft:
                target, index = by_peft[key[: -len(peft_suffix)]]
                if peft_suffix == ".lora_A.weight":
                    previous = peft_down.setdefault(target.lora_name, value)
                    if previous is not value and not torch.equal(previous, value):
                        raise UserError(f"--network_weights: '{key}' has its own lora_A, but networks.lora_sd3 "
                                        f"shares one down projection over {target.lora_name} (fused qkv); load this "
                                        "PEFT file with --network_module networks.lora")
                else:
                    peft_up.setdefault(target.lora_name, {})[index] = value
                break
        else:
            unknown.append(key)
    for name, down in peft_down.items():
        target = by_name[name]
        ups = peft_up.get(name, {})
        if len(ups) != len(target.parts):
            raise UserError(f"--network_weights: {name} needs lora_B of all of "
                            f"{', '.join(p.path for p in target.parts)}; the file has {len(ups)}")
        rank = int(down.shape[0])
        alpha = float(alpha_of(name, rank))
        rows_total = sum(int(v.shape[0]) for v in ups.values())
        up = torch.zeros((rows_total, *ups[0].shape[1:]), dtype=torch.float32)
        for index, part in enumerate(target.parts):
            rows = part.rows if part.rows is not None else torch.arange(rows_total)
            up[rows] = ups[index].float()
        internal[f"{name}.lora_down.weight"] = down
        internal[f"{name}.lora_up.weight"] = up * (rank / alpha)
        internal[f"{name}.alpha"] = torch.tensor(alpha)
    return internal, unknown


# =========================================================================================================
# KS entry points
# =========================================================================================================
def _family_of(mmdit) -> str:
    from networks.lora_keys import detect_family

    return detect_family(mmdit)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   mmdit, neuron_dropout: float | None = None, **kwargs) -> SD3LoRANetwork:
    """KS create_network (network_dim None -> 4, network_alpha None -> 1.0); kwargs: the --network_args strings."""
    o = validate_network_args(kwargs, _family_of(mmdit), network_dim=network_dim, network_alpha=network_alpha,
                              network_dropout=neuron_dropout)
    return SD3LoRANetwork(text_encoders, mmdit, multiplier, o)


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoders, mmdit,
                                weights_sd: dict | None = None, for_inference: bool = False,
                                neuron_dropout: float | None = None, **kwargs) -> tuple[SD3LoRANetwork, dict]:
    """KS create_network_from_weights: one module per module in the file with its rank and alpha (T5 modules when
    the file has lora_te3_ keys). Returns (network, weights as the network's state_dict keys)."""
    if weights_sd is None:
        weights_sd, _ = read_lora_file(file)
    o = validate_network_args(kwargs, _family_of(mmdit), network_dropout=neuron_dropout)
    everything = text_encoder_targets(text_encoders, True) + mmdit_targets(mmdit)
    internal, unknown = to_ks_state_dict(weights_sd, everything, lambda name, rank: rank)
    if not internal:
        raise UserError(f"--network_weights: none of the {len(weights_sd)} keys of {file} names a networks.lora_sd3 "
                        "module of this model; is the file for another model family?")
    if unknown:
        logger.warning("LoRA weights: %d keys of %s match no module, e.g. %s", len(unknown), file, unknown[:3])
    modules_dim = {k.split(".", 1)[0]: int(v.shape[0]) for k, v in internal.items() if k.endswith("lora_down.weight")}
    modules_alpha = {k.split(".", 1)[0]: float(v.float()) for k, v in internal.items() if k.endswith(".alpha")}
    network = SD3LoRANetwork(text_encoders, mmdit, multiplier, o, modules_dim=modules_dim,
                             modules_alpha=modules_alpha)
    return network, internal

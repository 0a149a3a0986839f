"""SD1.x / SD2.x family adapter (UNet2DConditionModel + CLIP / OpenCLIP-H text encoder, DDPM ε or v).

Loads a diffusers folder or an LDM single-file checkpoint (A1111 / ComfyUI layout) through
library/families/loading.py and the shipped configs (configs/models/sd15, configs/models/sd2v for --v2).
Text handling follows kohya sd-scripts (KS) library/train_util.py: `get_input_ids` (75-token chunks for
--max_token_length) and `get_hidden_states` (--clip_skip, chunk concatenation).

Text options that the protocol's encode_text cannot receive live in `Models.extra`:
{"clip_skip": int | None, "max_token_length": int | None, "v2": bool, "source": "diffusers" | "single_file"}.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError
from library.families import loading
from library.families import detect
from library.families.base import Family, ModelOptions, Models
from networks import lora_blocks, lora_keys

logger = logging.getLogger(__name__)

CLIP_CHUNK = 77            # CLIP's context: <BOS> + 75 tokens + <EOS>
CLIP_CHUNK_BODY = CLIP_CHUNK - 2
MAX_TOKEN_LENGTHS = (75, 150, 225)
# The SD2 LDM checkpoints hold the OpenCLIP-H text encoder here; SD1 holds CLIP-L under `transformer.`.
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CLIP_PREFIX = "cond_stage_model.transformer."


@dataclass
class SD1Options(ModelOptions):
    """The common model flags plus SD1's own (add_arguments)."""
    v2: bool = False
    clip_skip: int | None = None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """SD1's own model flags (KS train_network.py)."""
    group.add_argument("--v2", action="store_true", help="load an SD2.x model")
    group.add_argument("--clip_skip", type=int, default=None, help="use the output of the N-th last text-encoder layer")


def config_key(v2: bool) -> str:
    """Shipped config folder under configs/models/: SD2 (v or base: same architecture) or SD1.5."""
    return "sd2v" if v2 else "sd15"


# ----------------------------------------------------------------------------------------------
# Tokens and hidden states (KS get_input_ids / get_hidden_states, vectorised over the batch)
# ----------------------------------------------------------------------------------------------
def chunk_token_ids(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """[B, 2 + 75·n] ids (one BOS, up to 75·n tokens, EOS, padding) -> [B, 77·n]: n chunks <BOS> body <last>.

    KS train_util.get_input_ids: chunk c = ids[0] ‖ ids[1 + 75c : 76 + 75c] ‖ ids[−1]. With pad == eos (SD1)
    that is all. With pad ≠ eos (SD2 pads with '!'), KS then repairs each chunk: a chunk ending in a real token
    followed by pad/eos gets its last token set to <EOS>; a chunk that starts with padding (an empty chunk) gets
    <EOS> right after <BOS>."""
    n = (ids.shape[1] - 2) // CLIP_CHUNK_BODY
    chunks = []
    for c in range(n):  # n ≤ 3: a loop over chunks, not over samples
        body = ids[:, 1 + CLIP_CHUNK_BODY * c: 1 + CLIP_CHUNK_BODY * (c + 1)]
        chunk = torch.cat([ids[:, :1], body, ids[:, -1:]], dim=1)
        if pad_id != eos_id:
            before_last = chunk[:, -2]
            ends_in_token = (before_last != eos_id) & (before_last != pad_id)
            chunk[:, -1] = torch.where(ends_in_token, torch.full_like(before_last, eos_id), chunk[:, -1])
            starts_empty = chunk[:, 1] == pad_id
            chunk[:, 1] = torch.where(starts_empty, torch.full_like(before_last, eos_id), chunk[:, 1])
        chunks.append(chunk)
    return torch.cat(chunks, dim=1)


def merge_chunk_states(hidden: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B, 77·n, D] per-chunk hidden states -> [B, 2 + 75·n, D]: the first chunk's <BOS>, every chunk's 75 body
    states, the last chunk's final state (KS get_hidden_states, v1 branch). n = 1 returns the input unchanged.

    KS's v2 branch is the same computation: its extra repair compares token ids with the *string*
    tokenizer.eos_token, which is never true, so it never fires (a KS bug we do not copy as code)."""
    b, _, d = hidden.shape
    bodies = hidden.reshape(b, n_chunks, CLIP_CHUNK, d)[:, :, 1:-1].reshape(b, n_chunks * CLIP_CHUNK_BODY, d)
    return torch.cat([hidden[:, :1], bodies, hidden[:, -1:]], dim=1)


def clip_hidden_states(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """CLIP conditioning for [N, 77] ids: the last hidden state, or with clip_skip = k the output of layer −k
    followed by the final layer norm (KS / A1111 "CLIP skip"; k = 1 equals the last hidden state). No attention
    mask, as KS and the SD pipelines."""
    if clip_skip is None:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    # transformers >= 5.6 flattened CLIPTextModel: final_layer_norm sits on the model, not on .text_model.
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(out.hidden_states[-clip_skip])


# ----------------------------------------------------------------------------------------------
# Single-file conversion
# ----------------------------------------------------------------------------------------------
def _is_open_clip_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    return OPEN_CLIP_PREFIX + "token_embedding.weight" in state


def _check_v2_flag(state: dict[str, torch.Tensor], v2: bool) -> None:
    has_open_clip = _is_open_clip_checkpoint(state)
    has_clip = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in state
    if has_open_clip and not v2:
        raise UserError("--v2: the checkpoint holds an SD2 OpenCLIP text encoder (cond_stage_model.model.*); add --v2 "
                        "(and --v_parameterization for the 768-v models)")
    if has_clip and v2:
        raise UserError("--v2: the checkpoint holds an SD1 CLIP text encoder (cond_stage_model.transformer.*); remove "
                        "--v2")
    if not (has_open_clip or has_clip):
        raise UserError("--pretrained_model_name_or_path: no SD1/SD2 text encoder in the checkpoint "
                        "(cond_stage_model.*); is it an SDXL or SD3 file? use sdxl_train_network.py / "
                        "sd3_train_network.py")


def _text_encoder_state(state: dict[str, torch.Tensor], num_layers: int, model: Any) -> dict[str, torch.Tensor]:
    """The LDM text encoder in transformers CLIPTextModel keys (diffusers' converters)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if _is_open_clip_checkpoint(state):
        # SD2 files carry one resblock more than the model uses (SD2 conditions on the penultimate layer):
        # drop blocks past the configured depth instead of relying on diffusers' hard-coded layer-23 list.
        keep = {}
        block_prefix = OPEN_CLIP_PREFIX + "transformer.resblocks."
        for key, value in state.items():
            if key.startswith(block_prefix) and int(key[len(block_prefix):].split(".")[0]) >= num_layers:
                continue
            if key.startswith(OPEN_CLIP_PREFIX):
                keep[key] = value
        converted = convert_open_clip_checkpoint(model, keep, prefix=OPEN_CLIP_PREFIX)
    else:
        converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions keep it.
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    if not nested:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # text_projection: OpenCLIP has one, CLIPTextModel (no pooled projection) does not.
    return {k: v for k, v in converted.items() if not k.startswith("text_projection")}


def _load_single_file(path: str, opts: SD1Options, config_dir: str) -> tuple[Any, Any, Any]:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    state = loading.load_single_file_state_dict(path, opts.allow_pickle, lazy=True)  # read tensor by tensor
    _check_v2_flag(state, opts.v2)
    try:
        unet_config = UNet2DConditionModel.load_config(os.path.join(config_dir, "unet"), local_files_only=True)
        unet_state = convert_ldm_unet_checkpoint(state, unet_config)
        te_config = CLIPTextConfig.from_pretrained(os.path.join(config_dir, "text_encoder"), local_files_only=True)
        with torch.device("meta"):
            te_shape = CLIPTextModel(te_config)  # key names and depth only
        te_state = _text_encoder_state(state, te_config.num_hidden_layers, te_shape)
    except (KeyError, IndexError, ValueError) as err:
        # diffusers' converters index keys the config promises; a mismatch surfaces as a KeyError deep inside.
        raise UserError(f"--pretrained_model_name_or_path: '{path}' does not match the architecture in "
                        f"'{config_dir}' ({type(err).__name__}: {err}); pass --model_config DIR with the matching "
                        "configs (or --v2 for SD2)") from err
    # Each model reads its own weights from the file, one tensor at a time (library/streamed_load.py).
    text_encoder = loading.model_from_config(CLIPTextModel, config_dir, "text_encoder", te_state, opts.weight_dtype)
    del te_state
    unet = loading.model_from_config(UNet2DConditionModel, config_dir, "unet", unet_state, opts.weight_dtype)
    vae = loading.vae_from_single_file_state_dict(state, config_dir, opts.weight_dtype)
    return unet, vae, text_encoder


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------
def _validate_text_options(opts: SD1Options, num_layers: int) -> None:
    if opts.max_token_length is not None and opts.max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length: {opts.max_token_length} is not supported; use one of "
                        f"{', '.join(map(str, MAX_TOKEN_LENGTHS))} (or leave it unset for 75)")
    if opts.clip_skip is not None and not 1 <= opts.clip_skip <= num_layers:
        raise UserError(f"--clip_skip: {opts.clip_skip} is outside 1..{num_layers} (the text encoder's layer count); "
                        "use 1 (last layer) or 2 (penultimate, common for anime models)")


class SD1Adapter:
    """FamilyAdapter for SD1.x and SD2.x (--v2), ε or v prediction (--v_parameterization)."""

    name = "sd1"
    kind = "ddpm"
    bucket_reso_steps = 64

    def prediction_type(self, opts: SD1Options) -> str:
        return "v_prediction" if opts.v_parameterization else "epsilon"

    def load(self, opts: SD1Options) -> Models:
        """Diffusers folder or LDM single file -> Models (offline). --model_config only applies to single files
        (a diffusers folder carries its own configs); --vae replaces the VAE in either case."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        kind, path = loading.resolve_model_source(opts.pretrained_model_name_or_path, opts.allow_pickle)
        if kind == "diffusers":
            if opts.model_config:
                raise UserError("--model_config: only used with a single-file checkpoint; a diffusers folder carries "
                                "its own configs. Remove --model_config")
            config_dir = path
            unet = loading.load_component(UNet2DConditionModel, path, "unet", opts.weight_dtype, opts.allow_pickle)
            text_encoder = loading.load_component(CLIPTextModel, path, "text_encoder", opts.weight_dtype,
                                                  opts.allow_pickle)
            vae = None if opts.vae else loading.load_component(AutoencoderKL, path, "vae", opts.weight_dtype,
                                                               opts.allow_pickle)
        else:
            config_dir = loading.config_dir_for(config_key(opts.v2), opts.model_config)
            unet, vae, text_encoder = _load_single_file(path, opts, config_dir)
        if opts.vae:
            # A single-file VAE takes the architecture of the model it replaces (config_dir/vae/config.json).
            vae = loading.load_vae(opts.vae, config_dir, opts.allow_pickle, opts.weight_dtype)
        # the shipped sd2v config holds only tokenizer_config.json (pad "!"): the BPE files ship once, with sd15
        tokenizer = loading.load_clip_tokenizer(
            config_dir, "tokenizer", flag="--pretrained_model_name_or_path" if kind == "diffusers" else "--model_config")
        _validate_text_options(opts, text_encoder.config.num_hidden_layers)

        scheduler_config = dict(loading.read_scheduler_config(config_dir))
        folder_prediction = scheduler_config.get("prediction_type", "epsilon")
        prediction = self.prediction_type(opts)
        if kind == "diffusers" and folder_prediction != prediction:
            # KS decides by the flag alone; say so, because a v model trained as ε (or back) goes grey.
            logger.warning("the model's scheduler says prediction_type=%s but training uses %s "
                           "(--v_parameterization %s)", folder_prediction, prediction,
                           "given" if opts.v_parameterization else "not given")
        scheduler_config["prediction_type"] = prediction
        if opts.zero_terminal_snr:
            # For sample images only: the training schedule is rescaled by the loss engine (spec §0).
            scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        return Models(
            denoiser=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[tokenizer],
            alphas_cumprod=loading.alphas_cumprod_from_scheduler_config(scheduler_config),
            scheduler_config=scheduler_config,
            extra={"clip_skip": opts.clip_skip, "max_token_length": opts.max_token_length, "v2": opts.v2,
                   "source": kind},
        )

    def encode_images(self, models: Models, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z = vae.encode(x).latent_dist.sample() · scaling_factor (KS: a sample, not the mode)."""
        vae = models.vae
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * vae.config.scaling_factor

    def tokenize(self, models: Models, captions: list[str]) -> list[torch.Tensor]:
        """[B, 77] ids, or with --max_token_length N (75/150/225) [B, 77·N/75]: N/75 chunks of <BOS> 75 <EOS|PAD>
        laid side by side (KS get_input_ids)."""
        tokenizer = models.tokenizers[0]
        max_token_length = models.extra.get("max_token_length")
        length = CLIP_CHUNK if max_token_length is None else max_token_length + 2
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt").input_ids
        if max_token_length is None:
            return [ids]
        return [chunk_token_ids(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)]

    def encode_text(self, models: Models, tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [B, 77, D]} or, with --max_token_length N, [B, 2 + N, D] (KS: the first
        <BOS>, each chunk's 75 states, the last chunk's final state; 152 for N = 150, 227 for N = 225)."""
        text_encoder = models.text_encoders[0]
        ids = tokens[0].to(text_encoder.device)
        b, length = ids.shape
        n_chunks = length // CLIP_CHUNK
        hidden = clip_hidden_states(text_encoder, ids.reshape(b * n_chunks, CLIP_CHUNK), models.extra.get("clip_skip"))
        hidden = hidden.reshape(b, n_chunks * CLIP_CHUNK, hidden.shape[-1])
        if models.extra.get("max_token_length") is not None:
            hidden = merge_chunk_states(hidden, n_chunks)
        return {"encoder_hidden_states": hidden}

    def predict(self, models: Models, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """ε̂ or v̂ = unet(x_t, t, c).sample."""
        return models.denoiser(noisy_latents, timesteps, conditioning["encoder_hidden_states"]).sample

    def pipeline(self, models: Models) -> Any:
        """StableDiffusionPipeline over the same modules; DDIM from the scheduler config (prediction type of the
        run, zero-terminal-SNR rescale when trained with it); no safety checker."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler.from_config(models.scheduler_config)
        return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoders[0],
                                       tokenizer=models.tokenizers[0], unet=models.denoiser, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline_kwargs(self, models: Models) -> dict[str, Any]:
        """KS --clip_skip N is diffusers clip_skip N − 1."""
        clip_skip = models.extra.get("clip_skip")
        return {"clip_skip": clip_skip - 1} if clip_skip and clip_skip > 1 else {}


ADAPTER = SD1Adapter()


def base_model_version(args: argparse.Namespace) -> str:
    """KS ss_base_model_version (model_util.get_model_version_str_for_sd1_sd2): sd_v1 / sd_v2, + _v with
    --v_parameterization."""
    return ("sd_v2" if getattr(args, "v2", False) else "sd_v1") + ("_v" if args.v_parameterization else "")


def modelspec_architecture(args: argparse.Namespace) -> str:
    """KS sai_model_spec: stable-diffusion-v1, or v2-512 / v2-768-v."""
    if getattr(args, "v2", False):
        return "stable-diffusion-v2-768-v" if args.v_parameterization else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def write_tiny_model(out: str, seed: int = 0, single_file: str | None = None, model_config_out: str | None = None,
                     v2: bool = False, v_prediction: bool = False) -> dict:
    from library import tiny_models

    return tiny_models.write_tiny_sd1(out, single_file=single_file, config_dir=model_config_out, v2=v2,
                                      v_prediction=v_prediction, seed=seed)


# ----------------------------------------------------------------------------------------------
# Recognising this family's checkpoints before loading (library/families/detect.py asks)
# ----------------------------------------------------------------------------------------------
def recognise_checkpoint(ckpt: detect.Checkpoint) -> detect.Detected | None:
    """This family's diffusers folders and single files, from configs or tensor names (nothing loads)."""
    if ckpt.kind == "diffusers":
        if ckpt.pipeline_class and ckpt.pipeline_class not in ("StableDiffusionPipeline",
                                                               "StableDiffusionImg2ImgPipeline"):
            return None
        unet = ckpt.config("unet")
        te = ckpt.config("text_encoder")
        if not unet or "addition_embed_type" in unet and unet["addition_embed_type"]:
            return None
        v2 = te.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024
        return detect.Detected(SD1Adapter.name, "SD2.x" if v2 else "SD1.x", v2=v2,
                               v_prediction=detect.folder_prediction(ckpt), text_layers=te.get("num_hidden_layers"))
    if ckpt.has_prefix("cond_stage_model.model."):
        layers = ckpt.max_index(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")
        return detect.Detected(SD1Adapter.name, "SD2.x", v2=True,
                               text_layers=None if layers is None else layers + 1)
    if ckpt.has_prefix("cond_stage_model.transformer."):
        layers = ckpt.max_index(r"cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\.")
        return detect.Detected(SD1Adapter.name, "SD1.x", text_layers=None if layers is None else layers + 1)
    return None


FAMILY = Family(
    adapter_class=SD1Adapter, entry_script="train_network.py", prediction_types=("epsilon", "v_prediction"),
    options_class=SD1Options, add_arguments=add_arguments, aliases=("sd2",),
    lora_unet_targets=lora_keys.ks_unet_targets, lora_file_format="kohya",
    lora_block_layout=lora_blocks.SD_UNET_LAYOUT,
    recognise=recognise_checkpoint,
    detects=lambda denoiser: True,   # any UNet the more specific families (tried first) do not claim
    base_model_version=base_model_version, modelspec_architecture=modelspec_architecture,
    write_tiny_model=write_tiny_model, tiny_model_flags=("single_file", "model_config_out", "v2", "v_prediction"),
    default_resolution=512, latent_channels=4)

"""The one training loop, for every model family.

`train(args, adapter)` reads as a table of contents: validate everything -> accelerator -> data -> models ->
network -> optimizer -> resume -> loop -> save. A family differs only in its adapter (library/families).

Distributed training: each rank takes a disjoint share of every epoch's batches; LoRA gradients are averaged
across ranks with one all-reduce of a flat buffer per optimizer step (the network is not wrapped in DDP, which
never sees the UNet's forward because LoRA modules patch the frozen model's forwards).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from library import checkpointing, ks_compat, ks_run, metadata as metadata_lib, metrics as metrics_lib, optimizers
from library import host_memory, interrupts, lean, loss_outputs, loss_scaling, memory_modes, preflight, sampling
from library import speed
from library import validation as validation_lib
from library.checkpointing import TrainState
from library.data import data_warnings, latent_cache
from library.data.loader import batch_steps
from library.errors import UserError
from library.families import detect, get_family
from library.families.base import FamilyAdapter, ModelOptions
from library.loss_config import LossConfig
from networks import network_args as network_args_lib


# ----------------------------------------------------------------------------------------------------------------
# 1. Validation: everything a user can get wrong is checked here, before any model loads
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Validated plain values derived from the flags."""
    model: ModelOptions
    prediction_type: str
    loss: LossConfig
    train_unet: bool
    train_text_encoder: bool
    network_kwargs: dict[str, str]
    seed: int
    weight_dtype: torch.dtype = torch.float32
    save_dtype: torch.dtype = torch.float32
    memory: memory_modes.MemoryOptions = field(default_factory=memory_modes.MemoryOptions)
    optimizer: optimizers.OptimizerChoice | None = None
    scheduler: optimizers.SchedulerOptions | None = None


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "no": torch.float32, None: None}


def validate(args: argparse.Namespace, adapter: FamilyAdapter) -> Plan:
    family = adapter.name
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a diffusers folder or a .safetensors file)")
    if not args.output_dir:
        raise UserError("--output_dir is required (where the LoRA files are written)")
    if not args.train_data_dir and not args.dataset_config:
        raise UserError("give --train_data_dir (folders '<repeats>_<class tokens>') or --dataset_config FILE.toml")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights FILE")
    if args.network_weights and not os.path.isfile(args.network_weights):
        raise UserError(f"--network_weights: {args.network_weights} does not exist")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be at least 1")
    speed.check(getattr(args, "torch_compile", False), getattr(args, "dynamo_backend", "inductor"))
    speed.check_mixed_precision(args.mixed_precision)  # bf16 on a pre-Ampere GPU: fp16 is the fast choice
    if args.train_batch_size < 1:
        raise UserError("--train_batch_size must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        raise UserError("--max_train_steps must be at least 1")
    for flag in ("save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs",
                 "max_train_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be a positive integer (omit it to disable)")
    optimizer_type = optimizers.resolve_optimizer_type(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
    if args.learning_rate <= 0 and optimizer_type.lower() != "adafactor":
        raise UserError("--learning_rate must be positive")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UserError("--max_grad_norm must be >= 0 (0 disables clipping)")
    if args.xformers:
        try:
            importlib.import_module("xformers")
        except ImportError:
            raise UserError("--xformers: xformers is not installed; omit the flag (PyTorch SDPA is used)") from None
    if args.log_with in ("wandb", "all"):
        try:
            importlib.import_module("wandb")
        except ImportError:
            raise UserError(f"--log_with {args.log_with}: wandb is not installed; pip install wandb or use tensorboard")
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise UserError(f"--log_with {args.log_with} needs --logging_dir DIR (where tensorboard writes)")
    if args.sample_prompts:
        if not os.path.isfile(args.sample_prompts):
            raise UserError(f"--sample_prompts: {args.sample_prompts} does not exist")
        sampling.parse_prompt_file(args.sample_prompts)  # prompt-file mistakes surface before models load
    metrics_lib.validate_metric_options(args)
    if (args.sample_every_n_steps or args.sample_every_n_epochs) and not args.sample_prompts:
        raise UserError("--sample_every_n_steps/--sample_every_n_epochs need --sample_prompts FILE")
    memory = memory_modes.MemoryOptions.from_args(args)  # --full_bf16, --fp8_base, ... (KS semantics)
    ks_compat.check(args, family)  # KS flags refused here stop now; KS flags without effect print a note
    ks_run.check(args)
    preflight.check_numbers(args)  # nan, fp16 on a CPU, negative workers, seed range: before anything uses them
    cache_te = getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False)
    if cache_te and not args.network_train_unet_only and not hasattr(adapter, "encode_text_with_cache"):
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only (cached outputs cannot train "
                        "text-encoder LoRA)")
    if args.cache_latents_to_disk:
        args.cache_latents = True
    args.network_module = args.network_module or "networks.lora"  # KS's default is None (it then fails)
    try:
        importlib.import_module(args.network_module)
    except ImportError as e:
        raise UserError(f"--network_module {args.network_module}: cannot import it ({e})") from None
    optimizer_choice = optimizers.validate_optimizer_options(optimizer_type, args.optimizer_args, args.learning_rate)
    scheduler_options = optimizers.SchedulerOptions.from_args(args, optimizer_choice)
    network_kwargs = network_args_lib.validate(
        args.network_module, args.network_args, family, network_dim=args.network_dim, network_alpha=args.network_alpha,
        network_dropout=args.network_dropout, scale_weight_norms=getattr(args, "scale_weight_norms", None),
        fp8_base=bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)))

    model = get_family(family).options(args)
    # The model path and the family's own flag rules are checked here too, before anything heavy loads.
    from library.families import loading
    loading.resolve_model_source(args.pretrained_model_name_or_path, args.allow_pickle)
    found = detect.check_family(args.pretrained_model_name_or_path, family, getattr(args, "v2", False),
                                args.v_parameterization)
    preflight.check_clip_skip(getattr(args, "clip_skip", None), found.text_layers if found else None)
    get_family(family).check(model)
    prediction_type = adapter.prediction_type(model)
    loss = LossConfig.from_args(args, family, prediction_type)
    weight_dtype = _DTYPES[args.mixed_precision]
    model.weight_dtype = weight_dtype
    # output folders, names, numbers, --network_weights, --resume: after the defaults above are filled in
    preflight.check_before_load(args, family)
    return Plan(model=model, prediction_type=prediction_type, loss=loss,
                train_unet=not args.network_train_text_encoder_only,
                train_text_encoder=not args.network_train_unet_only, network_kwargs=network_kwargs,
                seed=args.seed if args.seed is not None else _random_seed(), weight_dtype=weight_dtype,
                save_dtype=_DTYPES[args.save_precision] or torch.float32, memory=memory,
                optimizer=optimizer_choice, scheduler=scheduler_options)


def _random_seed() -> int:
    """KS: without --seed a random one (printed, and written to ss_seed so the run can be repeated)."""
    import random

    seed = random.randint(0, 2**32)
    print(f"no --seed given: using --seed {seed}")
    return seed


# ----------------------------------------------------------------------------------------------------------------
# 2. Components
# ----------------------------------------------------------------------------------------------------------------
def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = args.log_with
    project_config = None
    if args.logging_dir:
        log_with = log_with or "tensorboard"
        logging_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        project_config = ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir)
    use_cpu = not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_config=project_config,
                       cpu=use_cpu, kwargs_handlers=ks_run.accelerator_kwargs(args))


def _own_weight_memory(module: torch.nn.Module) -> None:
    """Give CPU weights at unaligned addresses memory of their own (64-byte aligned, as torch allocates).

    Loaded safetensors weights point into the mapped file at arbitrary offsets, and CPU kernels choose their vector
    paths by alignment: the same model loaded from a diffusers folder and from a single file trained to different
    last bits. One tensor at a time, so the extra memory is the largest tensor."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """Seed of the global RNG for one micro-step (LoRA dropout, VAE sampling), so resumed runs replay exactly."""
    return (seed * 1_000_003 + step * 9_176 + micro_step * 131 + rank * 7) % (2**63 - 1)


def rank_batches(batches: list, rank: int, world_size: int) -> list:
    """This rank's share of an epoch: batches rank, rank + W, ...; wrapped so every rank gets the same count."""
    if not batches:
        return []
    count = math.ceil(len(batches) / world_size)
    return [batches[(rank + i * world_size) % len(batches)] for i in range(count)]


class _BatchList(torch.utils.data.Dataset):
    """This rank's batches of one epoch, from a position on (resume skips without loading).

    Items are (batch_number, indices): the batch number is the batch's place in the whole epoch, so caption and
    crop randomness does not depend on the number of processes. `steps[i]` is the optimizer step batch i trains
    in (KS token warmup grows captions with it)."""

    def __init__(self, group, batches: list[tuple[int, list[int]]], data_epoch: int, steps: list[int] | None = None):
        self.group, self.batches, self.data_epoch = group, batches, data_epoch
        self.steps = steps or [0] * len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        batch_number, indices = self.batches[i]
        return self.group.load_batch(indices, self.data_epoch, batch_number, step=self.steps[i])


def epoch_batches(group, epoch: int, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """This rank's (batch_number, indices) for 0-based `epoch` (the data layer counts epochs from 1, as KS)."""
    return rank_batches(list(enumerate(group.make_batches(epoch + 1))), rank, world_size)


def all_reduce_gradients(params: list[torch.nn.Parameter], world_size: int, stop_vote: float = 0.0) -> float:
    """Average the LoRA gradients over ranks with one all-reduce of a flat buffer.

    The buffer carries one more number, this rank's Ctrl-C vote, so every rank learns in the same step whether any
    rank was interrupted and all stop together. Returns the summed votes."""
    if world_size <= 1:
        return stop_vote
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([stop_vote], device=grads[0].device)])
    dist.all_reduce(flat)
    votes = flat[-1].item()
    flat = flat[:-1] / world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return votes


def check_ranks_agree(run: "Run") -> None:
    """With several processes, every rank must end with the same LoRA (and loss map): compare them, print the
    largest difference, and stop with an error if they diverged (a silent divergence would save rank 0's only)."""
    accelerator = run.accelerator
    if accelerator.num_processes <= 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in run.network.parameters()])
    loss_map = getattr(run.engine, "loss_map", None)
    if loss_map is not None:
        flat = torch.cat([flat, loss_map.values.to(flat.device).float()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    difference = (gathered - gathered[0]).abs().max().item()
    if accelerator.is_main_process:
        print(f"LoRA weights and loss maps on {accelerator.num_processes} processes: max difference {difference:.3g}")
    if difference > 0:
        raise RuntimeError(f"ranks diverged (max difference {difference}); please report this bug")


# ----------------------------------------------------------------------------------------------------------------
# 3. The loop
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything the loop and the save functions share."""
    args: argparse.Namespace
    plan: Plan
    adapter: Any
    accelerator: Any
    models: Any
    group: Any
    network: Any
    optimizer: Any
    lr_scheduler: Any
    engine: Any
    state: TrainState
    metadata: dict = field(default_factory=dict)
    interrupted: Any = None        # interrupts.StopSignals: .requested once Ctrl-C / SIGTERM / SIGUSR1 arrived
    metrics: Any = None            # LossMetrics: normalised and per-band losses, heatmap
    validation: Any = None         # ValidationSet, when the dataset holds validation images
    prompts: list = field(default_factory=list)


def train(args: argparse.Namespace, adapter: FamilyAdapter) -> str:
    """Train a LoRA; returns the path of the final LoRA file."""
    from library.data import build_dataset_group, DatasetOptions
    from library.engine import LossEngine

    plan = validate(args, adapter)
    metadata_lib.prefetch_model_hashes(args)  # hashed in the background while models load
    args.seed = plan.seed  # KS: a drawn seed becomes the run's seed (ss_seed, sample seeds)
    data_options = DatasetOptions.from_args(args)
    data_options.seed = plan.seed
    group = build_dataset_group(data_options)  # scans every image: data errors surface before models load
    if args.debug_dataset:  # KS: show the data, train nothing
        from library.data.debug import describe_epoch
        group.max_train_steps = args.max_train_steps
        print("\n".join(describe_epoch(group, 1, args.gradient_accumulation_steps)))
        return ""

    accelerator = make_accelerator(args)
    memory_modes.prepare_accelerator(accelerator, plan.memory)
    rank, world_size = accelerator.process_index, accelerator.num_processes

    models = adapter.load(plan.model)
    if args.xformers:
        models.denoiser.enable_xformers_memory_efficient_attention()
    device = accelerator.device
    for module in [models.denoiser, models.vae, *[te for te in models.text_encoders if te is not None]]:
        module.requires_grad_(False)
        module.eval()
        dtype = plan.weight_dtype if module is not models.vae else memory_modes.vae_dtype(
            plan.weight_dtype, args.no_half_vae, bool(getattr(getattr(module, "config", None), "force_upcast", False)))
        module.to(device)
        if next(module.parameters()).dtype != dtype:  # cast only when needed (diffusers warns on no-op casts)
            # diffusers' ModelMixin.to warns on every cast of a model (even one with no fp32-only modules, as the
            # VAE): the plain nn.Module cast does the same work without the warning
            torch.nn.Module.to(module, dtype=dtype)
        _own_weight_memory(module)
    memory_modes.apply_to_models(models, plan.memory)  # --fp8_base: before any network patches the layers
    speed.vae_layout(models.vae, device)

    data_warnings.warn_about_long_captions({item.path: item.caption for item in group.items}, models.tokenizers[0],
                                           args.max_token_length or 75)
    # Latents (and text-encoder outputs) are cached once, before training; the main process writes disk caches.
    # VAE sampling draws from the global RNG: seed it so cached latents are the same in every run and rank.
    torch.manual_seed(plan.seed)
    host_memory.apply(device.type, getattr(args, "return_freed_memory", False))  # models loaded: reuse the heap
    if args.cache_latents:
        _cache_latents(args, adapter, models, group, accelerator)
    if getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False):
        _cache_text_encoder_outputs(args, adapter, models, group, accelerator)

    ks_run.merge_base_weights(args, models, plan.weight_dtype, device)  # --base_weights: into the frozen model (KS)
    torch.manual_seed(plan.seed)  # the same LoRA initialisation on every rank and in every run with this seed
    network = _make_network(args, plan, models)
    preflight.check_room_for_saves(args.output_dir, network, plan.save_dtype, args.save_state)
    memory_modes.enable_gradient_checkpointing(models, network, plan.memory, plan.train_text_encoder)
    network.to(device)
    memory_modes.cast_network(network, plan.memory)  # --full_bf16 / --full_fp16
    channels_last = getattr(args, "channels_last", False) or speed.channels_last_by_default(device, plan.weight_dtype)
    speed.apply(models, channels_last,  # after LoRA patched the denoiser's layers
                args.dynamo_backend if getattr(args, "torch_compile", False) else None)

    # Steps: an epoch is this rank's share of batches; an optimizer step is gradient_accumulation_steps of them.
    micro_per_epoch = len(epoch_batches(group, 0, rank, world_size))
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    group.max_train_steps = args.max_train_steps  # a fractional --token_warmup_step is a share of it (KS)
    args.save_every_n_epochs = ks_run.save_every_n_epochs(args, num_epochs)

    engine = LossEngine(plan.loss, adapter.kind, plan.prediction_type, models.alphas_cumprod, seed=plan.seed,
                        rank=rank, world_size=world_size, max_train_steps=args.max_train_steps,
                        zero_terminal_snr=args.zero_terminal_snr,
                        flow_shift=getattr(plan.loss, "timestep_shift", 1.0) or 1.0,
                        grad_accum_steps=args.gradient_accumulation_steps)
    if engine.learned is not None:  # --loss_weighting learned: u(σ) trains beside the LoRA, on its device
        engine.learned.to(device)
    optimizer, lr_scheduler = _make_optimizer(args, plan, network)
    optimizer = accelerator.prepare(optimizer)

    state = TrainState(seed=plan.seed, world_size=world_size)
    if args.resume:
        state = _resume(args, network, optimizer, lr_scheduler, engine, accelerator, world_size)

    started_at = time.time()
    run = Run(args=args, plan=plan, adapter=adapter, accelerator=accelerator, models=models, group=group,
              network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, engine=engine, state=state)
    run.metrics = metrics_lib.LossMetrics(heatmap_every=args.heatmap_every_n_steps)
    if args.resume and os.path.isfile(os.path.join(args.resume, "metrics.pt")):
        run.metrics.load_state_dict(torch.load(os.path.join(args.resume, "metrics.pt"), weights_only=True))
    if group.validation_items():
        seed = args.validation_seed if args.validation_seed is not None else plan.seed
        run.validation = validation_lib.ValidationSet.build(group, adapter, models, engine, seed=seed,
                                                            num_levels=args.validation_timesteps,
                                                            batch_size=args.train_batch_size,
                                                            max_batches=args.max_validation_steps)
    elif args.validate_every_n_steps or args.validate_every_n_epochs:
        raise UserError("--validate_every_n_steps/--validate_every_n_epochs: the dataset holds no validation images; "
                        "add --validation_split 0.1 or an is_val subset in the dataset TOML")
    if args.sample_prompts:
        run.prompts = sampling.parse_prompt_file(args.sample_prompts)
    # latents cached, no sampling or validation: the VAE is not needed again
    lean.release_unused_vae(models, group,
                            bool(args.cache_latents and not args.sample_prompts and run.validation is None))
    run.metadata = metadata_lib.training_metadata(
        args, adapter.name, num_train_images=group.num_train_images, num_reg_images=group.num_reg_images,
        num_batches_per_epoch=micro_per_epoch, num_epochs=num_epochs, started_at=started_at,
        loss_metadata=plan.loss.metadata(), dataset_metadata=group.metadata(),
        optimizer_name=plan.optimizer.metadata_name(), num_processes=world_size,
        num_validation_images=len(group.validation_items()))
    run.metadata.update(models.extra.get("metadata", {}))  # what the family knows from the loaded model
    if accelerator.is_main_process and accelerator.log_with:
        ks_run.login_wandb(args)
        accelerator.init_trackers(args.log_tracker_name or "network_train", config=ks_run.tracker_config(args),
                                  init_kwargs=ks_run.tracker_init_kwargs(args))
    if accelerator.is_main_process:
        print(f"training {adapter.name} LoRA: {group.num_train_images} images, {micro_per_epoch} batches per epoch "
              f"per process, {args.max_train_steps} steps, {world_size} process(es)")

    with interrupts.StopSignals() as stop:
        run.interrupted = stop
        try:
            if args.sample_at_first and run.prompts and state.step == 0:
                _sample_images(run, sampling.sample_label(step=0))
            _loop(run, steps_per_epoch, micro_per_epoch, num_epochs)
        except KeyboardInterrupt:
            _save_on_stop(run, stop)
            raise SystemExit(130)
        except interrupts.StopNow as e:
            print(f"\n{e}: stopped without saving; the last save in {args.output_dir} is intact", file=sys.stderr)
            raise SystemExit(130)
        except Exception as e:  # noqa: BLE001  disk full, a bad file mid-run, a bug: keep the work, then stop
            _save_on_failure(run, e)

        accelerator.wait_for_everyone()
        check_ranks_agree(run)
        final_name = checkpointing.last_name(args.output_name)
        final = os.path.join(args.output_dir, final_name + ".safetensors")
        _heatmap_at_save(run)
        try:
            with interrupts.shared_outcome(accelerator.num_processes, accelerator.device):
                if accelerator.is_main_process:
                    with stop.saving():
                        final = _save_lora(run, final_name, epoch=num_epochs)  # KS writes the planned epoch count
                        if args.save_state or args.save_state_on_train_end:
                            _save_state(run, os.path.join(args.output_dir, final_name + "-state"))
        except interrupts.SaveFailed as e:
            _save_on_failure(run, e)
        if accelerator.is_main_process:
            loss_outputs.write_loss_files(run.engine, run.metrics, args.output_dir, final_name + "-")
            print(f"saved {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _loop(run: Run, steps_per_epoch: int, micro_per_epoch: int, num_epochs: int) -> None:
    args, accelerator, state, engine = run.args, run.accelerator, run.state, run.engine
    rank, world_size = accelerator.process_index, accelerator.num_processes
    accum = args.gradient_accumulation_steps
    params = [p for p in run.network.parameters() if p.requires_grad]
    # --loss_weighting learned: u's gradients are averaged over ranks with the LoRA's (not clipped with them)
    learned_params = engine.learned.parameters() if engine.learned is not None else []
    bar = tqdm(total=args.max_train_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc="steps", smoothing=0)
    recent: list[float] = []
    while state.step < args.max_train_steps and state.epoch < num_epochs:
        batches = epoch_batches(run.group, state.epoch, rank, world_size)
        if hasattr(run.network, "on_epoch_start"):
            run.network.on_epoch_start(run.models.text_encoders, run.models.denoiser)
        micro_step = state.micro_in_epoch % accum
        remaining = batches[state.micro_in_epoch:]
        steps = batch_steps(state.step, state.micro_in_epoch, accum, len(remaining))
        loader = torch.utils.data.DataLoader(
            _BatchList(run.group, remaining, state.epoch + 1, steps), batch_size=None, shuffle=False,
            num_workers=ks_run.data_loader_workers(args.max_data_loader_n_workers, bool(args.cache_latents)),
            persistent_workers=False, worker_init_fn=interrupts.ignore_stop_signals)
        step_losses: list[torch.Tensor] = []
        for batch in loader:
            torch.manual_seed(step_seed(state.seed, state.step, micro_step, rank))
            result, levels = _forward_backward(run, batch, micro_step)
            step_losses.append(result.loss.detach())
            state.micro_in_epoch += 1
            micro_step += 1
            last_of_epoch = state.micro_in_epoch == len(batches)
            if micro_step < accum and not last_of_epoch:
                continue
            # One optimizer step: average grads over ranks, clip, step, schedule.
            cluster = engine.cluster_for_step(state.step)
            if cluster is not None:  # the timestep-clustered optimizer steps only this cluster's state (spec §6)
                _raw_optimizer(run.optimizer).set_cluster(cluster)
            stop_votes = all_reduce_gradients(params + learned_params, world_size,
                                              float(bool(run.interrupted and run.interrupted.requested)))
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            if engine.learned is not None:  # before the LoRA's step: fp16's GradScaler.update() inside it ends the step
                engine.learned.step(accelerator.scaler)
            if loss_scaling.optimizer_step(accelerator, run.optimizer):
                run.lr_scheduler.step()  # not after an update fp16's GradScaler skipped on inf/NaN (KS, accelerate)
            run.optimizer.zero_grad(set_to_none=True)
            max_norm_logs = _scale_weight_norms(run)
            state.step += 1
            micro_step = 0
            loss_value = torch.stack(step_losses).mean().item()
            step_losses = []
            recent.append(loss_value)
            recent = recent[-100:]
            bar.update(1)
            logs = {"loss/current": loss_value, "loss/average": sum(recent) / len(recent),
                    **{f"lr/group{i}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)},
                    **run.metrics.step_logs(state.step), **max_norm_logs}
            if run.validation is not None and validation_lib.due_at_step(state.step, args.validate_every_n_steps):
                logs.update(_validate(run))
            bar.set_postfix(loss=f"{loss_value:.4f}", avr_loss=f"{logs['loss/average']:.4f}",
                            norm=f"{logs.get('loss/normalized', float('nan')):.3f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
            if cluster is not None:
                logs["optimizer/state_bytes"] = _raw_optimizer(run.optimizer).memory_bytes()
            if accelerator.log_with:
                accelerator.log(logs, step=state.step)
                _log_images(run)
            if args.sample_every_n_steps and state.step % args.sample_every_n_steps == 0:
                _sample_images(run, sampling.sample_label(step=state.step))
            _maybe_save_every_n_steps(run)
            if stop_votes > 0:
                raise KeyboardInterrupt  # at a step boundary, on every rank, so the saved state is consistent
            if state.step >= args.max_train_steps:
                break
        if state.micro_in_epoch >= len(batches):
            state.epoch += 1
            state.micro_in_epoch = 0
            if run.validation is not None and validation_lib.due_at_epoch_end(state.epoch, args.validate_every_n_epochs) \
                    and not args.validate_every_n_steps:
                epoch_logs = _validate(run)
                if accelerator.log_with:
                    accelerator.log({**epoch_logs, "epoch": state.epoch}, step=state.step)
            if args.sample_every_n_epochs and state.epoch % args.sample_every_n_epochs == 0:
                _sample_images(run, sampling.sample_label(epoch=state.epoch))
            _maybe_save_every_n_epochs(run, num_epochs)
    bar.close()
    raw = _raw_optimizer(run.optimizer)
    if hasattr(raw, "memory_bytes") and accelerator.is_main_process:
        print(f"timestep-clustered optimizer: {raw.num_clusters} states, {raw.memory_bytes() / 2**20:.2f} MiB")


def _scale_weight_norms(run: Run) -> dict[str, float]:
    """--scale_weight_norms (KS): max-norm of every module's update after the optimizer step; KS's log names."""
    if not getattr(run.args, "scale_weight_norms", None):
        return {}
    keys_scaled, mean_norm, max_norm = run.network.apply_max_norm_regularization(run.args.scale_weight_norms,
                                                                                 run.accelerator.device)
    return {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm, "norm/avg_key_norm": mean_norm}


def _validate(run: Run) -> dict[str, float]:
    """The fixed validation loss (all ranks take part; every rank gets the same numbers)."""
    with optimizers.evaluation_weights(run.optimizer):  # schedule-free: validate the evaluation point (KS)
        logs = run.validation.compute(run.adapter, run.models, run.engine,
                                      validation_lib.text_conditioning(run.adapter, run.models), run.accelerator,
                                      step=run.state.step, network=run.network)
    if run.accelerator.is_main_process and "loss/validation" in logs:
        tqdm.write(f"step {run.state.step}: validation loss {logs['loss/validation']:.5f}")
    return logs


def _log_images(run: Run) -> None:
    """Tensorboard extras: the timestep histogram every step, the loss heatmap every --heatmap_every_n_steps."""
    if not run.accelerator.is_main_process or run.args.log_with not in (None, "tensorboard", "all"):
        return
    writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
    counts, edges = run.metrics.timestep_histogram()
    if counts.sum() > 0:
        writer.add_histogram_raw("timesteps/sampled", **metrics_lib.histogram_raw_kwargs(counts, edges),
                                 global_step=run.state.step)
    if run.state.step % run.args.heatmap_every_n_steps == 0 and len(run.metrics.heatmap_array()[0]):
        writer.add_image("loss/timestep_heatmap", run.metrics.heatmap_image(), run.state.step, dataformats="HWC")
        if run.engine.learned is not None:
            writer.add_image("loss/learned_weighting", loss_outputs.learned_weighting_image(run.engine),
                             run.state.step, dataformats="HWC")


def _heatmap_at_save(run: Run) -> None:
    """At every save and at the end: a heatmap row for this step, and the image in tensorboard (a short run
    would otherwise have none: rows are added every --heatmap_every_n_steps)."""
    if not run.metrics.add_heatmap_row(run.state.step) or not run.accelerator.is_main_process:
        return
    if run.accelerator.log_with and run.args.log_with in (None, "tensorboard", "all"):
        writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("loss/timestep_heatmap", run.metrics.heatmap_image(), run.state.step, dataformats="HWC")


def _sample_images(run: Run, label: str) -> None:
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        with optimizers.evaluation_weights(run.optimizer):
            paths = sampling.generate_samples(run.adapter, run.models, run.prompts, run.args.output_dir, label,
                                              run.args.sample_sampler, seed=run.plan.seed,
                                              output_name=run.args.output_name, network=run.network,
                                              autocast=run.accelerator.autocast)
            tqdm.write(f"{label}: {len(paths)} sample image(s) in {os.path.join(run.args.output_dir, 'sample')}")
    run.accelerator.wait_for_everyone()


def _raw_optimizer(optimizer):
    """The optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _forward_backward(run: Run, batch: dict, micro_step: int):
    """One micro-batch: conditioning -> levels -> noise -> prediction -> loss -> backward."""
    args, plan, adapter, models, engine, accelerator = run.args, run.plan, run.adapter, run.models, run.engine, run.accelerator
    device = accelerator.device
    step = run.state.step
    with torch.no_grad():
        if batch.get("latents") is not None:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = _encode_latents(adapter, models, batch["images"], device)
    if batch.get("text_encoder_outputs") is not None:
        conditioning = {k: v.to(device) for k, v in batch["text_encoder_outputs"].items()}
        if plan.train_text_encoder:  # a partial cache (Flux: T5 cached, the trained CLIP-L runs live)
            tokens = [t.to(device) for t in adapter.tokenize(models, batch["captions"])]
            with accelerator.autocast():
                conditioning = adapter.encode_text_with_cache(models, tokens, conditioning)
    else:
        tokens = [t.to(device) for t in adapter.tokenize(models, batch["captions"])]
        with torch.set_grad_enabled(plan.train_text_encoder), accelerator.autocast():
            conditioning = adapter.encode_text(models, tokens)

    levels = engine.sample_levels(step, latents.shape[0], micro_step, device=device, latent_shape=tuple(latents.shape))
    noise = engine.sample_noise(latents, step, micro_step)
    noisy, target = engine.make_inputs(latents, noise, levels)
    with accelerator.autocast():
        pred = adapter.predict(models, noisy.to(plan.weight_dtype), levels.timesteps, conditioning, batch)
    mask = batch.get("masks")  # --masked_loss / --alpha_mask: [B, 1, h, w] in [0, 1], else None
    result = engine.loss(pred.float(), target.float(), levels, step, noisy=noisy,
                         sample_weights=batch["loss_weights"].to(device),
                         mask=mask.to(device) if mask is not None else None)
    accelerator.backward(result.loss / args.gradient_accumulation_steps)
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    engine.record(result, levels, gather=gather)
    run.metrics.observe(*metrics_lib.gathered_samples(levels.bins, result.raw.detach(), gather))
    return result, levels


# ----------------------------------------------------------------------------------------------------------------
# 4. Setup helpers
# ----------------------------------------------------------------------------------------------------------------
def _encode_latents(adapter, models, images: torch.Tensor, device) -> torch.Tensor:
    """The VAE's fp32 latents of images in [-1, 1], contiguous: a channels_last VAE (speed.vae_layout) returns
    NHWC latents, which would run the UNet in NHWC."""
    return adapter.encode_images(models, images.to(device, torch.float32)).float().contiguous()


def _cache_latents(args, adapter, models, group, accelerator) -> None:
    cache_key = latent_cache.vae_cache_key(adapter.name, models.vae)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _encode_latents(adapter, models, images, accelerator.device).cpu()

    # The main process fills the disk cache first; the others then read it instead of recomputing.
    if args.cache_latents_to_disk:
        if accelerator.is_main_process:
            group.cache_latents(encode, to_disk=True, cache_key=cache_key, batch_size=args.vae_batch_size,
                                device=accelerator.device)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            group.cache_latents(encode, to_disk=True, cache_key=cache_key, batch_size=args.vae_batch_size,
                                device=accelerator.device)
    else:
        group.cache_latents(encode, to_disk=False, cache_key=cache_key, batch_size=args.vae_batch_size,
                            device=accelerator.device)


def _cache_text_encoder_outputs(args, adapter, models, group, accelerator) -> None:
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = [t.to(accelerator.device) for t in adapter.tokenize(models, captions)]
        with torch.no_grad():
            return {k: v.float().cpu() for k, v in adapter.encode_text(models, tokens).items()}

    # the family's own option identity, plus the encoders' weights, the tokenizers and the text options
    cache_key = latent_cache.text_encoder_cache_key(get_family(adapter.name).text_encoder_cache_key(args),
                                                    models.text_encoders, models.tokenizers, args)
    to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
    if to_disk and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    group.cache_text_encoder_outputs(encode, to_disk=to_disk, cache_key=cache_key)
    if to_disk and accelerator.is_main_process:
        accelerator.wait_for_everyone()


def _make_network(args, plan: Plan, models):
    from networks import lora_format
    text_encoders = models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]
    if args.dim_from_weights:
        network, _ = network_args_lib.create_network_from_weights(args.network_module, 1.0, args.network_weights,
                                                                  models.vae, text_encoders, models.denoiser,
                                                                  **plan.network_kwargs)
    else:
        network = network_args_lib.create_network(args.network_module, 1.0, args.network_dim, args.network_alpha,
                                                  models.vae, text_encoders, models.denoiser,
                                                  neuron_dropout=args.network_dropout, **plan.network_kwargs)
    if getattr(args, "scale_weight_norms", None):
        network_args_lib.check_network_supports_max_norm(network, args.network_module)
    network.apply_to(text_encoders, models.denoiser, plan.train_text_encoder, plan.train_unet)
    network_args_lib.prepare_network(network, args.network_module, models.denoiser, text_encoders)  # file names
    lora_format.apply(network, args)  # --lora_format (SD3 family flag): peft | kohya keys
    if args.network_weights:  # with --dim_from_weights too: the shapes came from the file, so do the weights
        info = network_args_lib.load_network_weights(network, args.network_module, args.network_weights,
                                                     models.denoiser)
        print(f"loaded --network_weights {args.network_weights}: {info}")
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc(text_encoders, models.denoiser)
    return network


def _make_optimizer(args, plan: Plan, network):
    from library.cluster_optim import ClusteredOptimizer, ClusteredLRScheduler

    te_lr = args.text_encoder_lr
    if isinstance(te_lr, list):
        te_lr = te_lr[0] if len(te_lr) == 1 else (te_lr or None)
    param_groups = network.prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)
    if isinstance(param_groups, tuple):  # KS networks return (params, descriptions)
        param_groups = param_groups[0]
    factory = optimizers.make_optimizer_factory(plan.optimizer, args.learning_rate)
    factory = memory_modes.wrap_optimizer_factory(factory, plan.memory, plan.seed)  # --stochastic_rounding

    def make_scheduler(opt, share: int = 1):
        # per_cluster: each cluster's scheduler steps ~1/K of the time, so its horizon is 1/K of the run
        return plan.scheduler.build(opt, args.max_train_steps, share)

    clusters = plan.loss.timestep_clusters or 0
    if clusters > 0:
        optimizer = ClusteredOptimizer(factory, param_groups, clusters)
        if plan.loss.cluster_lr_schedule == "per_cluster":
            return optimizer, ClusteredLRScheduler(lambda opt: make_scheduler(opt, clusters), optimizer)
        return optimizer, make_scheduler(optimizer)
    optimizer = factory(param_groups)
    return optimizer, make_scheduler(optimizer)


def _resume(args, network, optimizer, lr_scheduler, engine, accelerator, world_size: int) -> TrainState:
    saved = checkpointing.load_state(args.resume)
    missing, unexpected = network.load_state_dict(saved["network"], strict=False)
    if unexpected or [k for k in missing if "lora" in k]:
        raise UserError(f"--resume: {args.resume} holds a different network (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]}); use the same --network_* flags as the saved run")
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if saved["engine"] is not None:
        engine.load_state_dict(saved["engine"])
    if saved["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    state = saved["train_state"]  # its process count was checked against this run's before the models loaded
    if accelerator.is_main_process:
        print(f"resumed from {args.resume} at step {state.step} (epoch {state.epoch + 1})")
    return state


# ----------------------------------------------------------------------------------------------------------------
# 5. Saving
# ----------------------------------------------------------------------------------------------------------------
def _save_lora(run: Run, name: str, epoch: int | None = None, folder: str | None = None) -> str:
    """`epoch`: ss_epoch as KS counts it (default: the current 0-based epoch, what KS writes at step saves);
    `folder`: --output_dir unless an emergency copy goes elsewhere."""
    folder = folder or run.args.output_dir
    path = os.path.join(folder, name + ".safetensors")
    with interrupts.save_errors(path):
        os.makedirs(folder, exist_ok=True)
        modelspec = metadata_lib.modelspec(run.args, run.adapter.name,
                                           metadata_lib.parse_resolution(run.args.resolution), time.time())
        md = metadata_lib.finish_metadata(run.metadata, run.state.step, run.state.epoch if epoch is None else epoch,
                                          no_metadata=run.args.no_metadata, modelspec_keys=modelspec)
        with optimizers.evaluation_weights(run.optimizer):  # schedule-free: save the evaluation point (KS)
            network_args_lib.save_network_weights(run.network, path, run.plan.save_dtype, md)
    return path


def _save_state(run: Run, folder: str) -> None:
    loss_map = run.engine.loss_map.values if run.engine.loss_map is not None else None
    scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None
    with interrupts.save_errors(folder):
        checkpointing.save_state(folder, network_state=run.network.state_dict(),
                                 optimizer_state=run.optimizer.state_dict(),
                                 scheduler_state=run.lr_scheduler.state_dict(), engine_state=run.engine.state_dict(),
                                 train_state=run.state, scaler_state=scaler,
                                 loss_map=loss_map,
                                 metrics_state=run.metrics.state_dict(),
                                 run_flags=preflight.state_flags(run.args, run.adapter.name,
                                                                 run.accelerator.num_processes))
        loss_outputs.write_loss_files(run.engine, run.metrics, folder)  # loss map CSV/PNG, learned weights, heatmap


def _save_on_stop(run: Run, stop) -> None:
    """Ctrl-C / SIGTERM / SIGUSR1: every rank stopped at the same step boundary; the main process saves the
    LoRA and the state (signals held back meanwhile) and prints the command that resumes."""
    if not run.accelerator.is_main_process:
        return
    name = checkpointing.step_name(run.args.output_name, run.state.step)
    state_folder = os.path.join(run.args.output_dir, name + "-state")
    try:
        with stop.saving():
            path = _save_lora(run, name)
            _save_state(run, state_folder)
    except interrupts.SaveFailed as e:
        _save_on_failure(run, e)
    print(f"\nstopped by {stop.signal_name or 'Ctrl-C'} at step {run.state.step}: saved {path} and its state "
          f"{state_folder}\nresume with: {interrupts.resume_command(state_folder)}", flush=True)


def _save_on_failure(run: Run, error: BaseException) -> None:
    """A failed save, or any other error mid-run. The files already written are intact (atomic writes). If the
    LoRA is still finite, write it and its state once more: into --output_dir unless that is what failed, else
    into a folder on another filesystem (interrupts.emergency_folder). Then stop: a failed save with one line,
    any other error with its own message (a traceback for a bug) after the line saying where the copy is."""
    if not run.accelerator.is_main_process:
        raise error
    print(file=sys.stderr, flush=True)  # end the progress bar's line
    name = checkpointing.step_name(run.args.output_name, run.state.step)
    healthy = all(torch.isfinite(p).all() for p in run.network.parameters())
    saved_in = None
    if healthy:
        folders = [] if isinstance(error, interrupts.SaveFailed) else [run.args.output_dir]
        need = 4 * sum(p.numel() for p in run.network.parameters()) * 4
        for folder in folders + [interrupts.emergency_folder(run.args.output_dir, need)]:
            if folder is None:
                continue
            try:
                _save_lora(run, name, folder=folder)
                _save_state(run, os.path.join(folder, name + "-state"))
                saved_in = folder
                break
            except interrupts.SaveFailed as e:
                print(f"error: {e}", file=sys.stderr)
                if folder != run.args.output_dir:
                    interrupts.remove_folder_quietly(folder)
    if saved_in:
        state_folder = os.path.join(saved_in, name + "-state")
        note = (f"the LoRA and state at step {run.state.step} were saved in {saved_in}; resume with: "
                f"{interrupts.resume_command(state_folder, None if saved_in == run.args.output_dir else saved_in)}")
    else:
        note = ("no copy was saved (" + ("the LoRA holds NaN/inf" if not healthy else "no folder with room") + ")")
    if isinstance(error, UserError):
        kept = "; the previous LoRA and state files are intact" if isinstance(error, interrupts.SaveFailed) else ""
        raise UserError(f"{error}{kept}; {note}") from None
    print(f"error at step {run.state.step}: {type(error).__name__}: {error}\n{note}", file=sys.stderr, flush=True)
    raise error


def _maybe_save_every_n_steps(run: Run) -> None:
    args, step = run.args, run.state.step
    if args.save_every_n_steps and step % args.save_every_n_steps == 0:  # the last step too, as KS
        _save_checkpoint(run, checkpointing.step_name(args.output_name, step), "step", step,
                         args.save_last_n_steps, args.save_every_n_steps, args.save_last_n_steps_state)


def _maybe_save_every_n_epochs(run: Run, num_epochs: int) -> None:
    args, epoch = run.args, run.state.epoch
    if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < num_epochs:
        _save_checkpoint(run, checkpointing.epoch_name(args.output_name, epoch), "epoch", epoch,
                         args.save_last_n_epochs, args.save_every_n_epochs, args.save_last_n_epochs_state)


def _save_checkpoint(run: Run, name: str, by: str, count: int, keep_last_n: int | None, every: int,
                     keep_last_n_states: int | None = None) -> None:
    """An intermediate save: the LoRA, its state with --save_state, and old saves pruned (--save_last_n_* for
    the files; --save_last_n_*_state, else --save_last_n_*, for the state folders, as KS)."""
    run.accelerator.wait_for_everyone()
    _heatmap_at_save(run)
    with interrupts.shared_outcome(run.accelerator.num_processes, run.accelerator.device):  # all stop on a failure
        if run.accelerator.is_main_process:
            with run.interrupted.saving() if run.interrupted else contextlib.nullcontext():
                _save_lora(run, name, epoch=run.state.epoch)  # KS: ss_epoch is the 0-based epoch at step saves
                if run.args.save_state:
                    _save_state(run, os.path.join(run.args.output_dir, name + "-state"))
    if run.accelerator.is_main_process:
        out, output_name = run.args.output_dir, run.args.output_name
        checkpointing.remove_old_saves(out, output_name, keep_last_n, count, by, every, what="files")
        checkpointing.remove_old_saves(out, output_name, keep_last_n_states or keep_last_n, count, by, every,
                                       what="states")

"""Validation loss: held-out images at fixed noise levels with fixed noise, so the number changes only when the
weights do (spec §7: "a fixed validation loss (fixed noise and fixed timesteps per image)").

    vset = ValidationSet.build(group, adapter, models, engine, seed=validation_seed, num_levels=10)   # once
    logs = vset.compute(adapter, models, engine, text_conditioning(adapter, models), accelerator, step=step)
    # {"loss/validation": MSE, "loss/validation_weighted": the engine's objective,
    #  "loss/validation/bin_00".. : MSE at each fixed level}

What is fixed, and why the number is reproducible:
* images: the group's validation items (``is_val`` subsets, ``validation_split``), centre-cropped, deterministic
  captions; latents encoded once at build time with a VAE sample drawn from a generator keyed on
  (validation_seed, item index) (or the latent cache's latents);
* noise levels: n equidistant levels of the family's own u → t / σ map (``fixed_validation_levels``);
* noise: ε of each (image, level) pair from a generator keyed on (validation_seed, item index, level), so it
  does not depend on the batch size, the batch composition or the number of processes;
* each process evaluates the pairs p ≡ rank (mod world size) (disjoint shares); (pair id, loss) records are
  gathered and reduced in pair order in fp64, so the means do not depend on how pairs were split;
* no gradients, models (and the network) in eval mode, every module's train/eval flag restored afterwards, the
  global RNG state restored: a run with validation trains exactly as one without.
Validation measures the plain objective: no input perturbation (--ip_noise_gamma), offset or multires noise.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from library import families, rng
from library.engine import LossEngine, NoiseLevels
from library.errors import UserError
from library.losses import per_sample_mean
from library.objective import prediction_to_loss_space

STREAM_VALIDATION_NOISE = "validation_noise"      # ε of pair (item, level): key (seed, step=item, rank=level)
STREAM_VALIDATION_LATENTS = "validation_latents"  # the VAE posterior sample of an item: key (seed, step=item)

Conditioning = Callable[[dict[str, Any]], dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# Levels
# ----------------------------------------------------------------------------------------------------------------
def fixed_validation_levels(engine: LossEngine, n: int) -> NoiseLevels:
    """n equidistant noise levels: u_i = (i + ½)/n, i = 0..n−1, mapped by the engine (CPU).

    DDPM: t_i = t_min + ⌊u_i·(t_max − t_min)⌋ (n = 10, full range: 50, 150, ..., 950); flow: σ_i =
    (t_min + S_s(u_i)·(t_max − t_min))/T with the run's shift s. Using the engine's own map means level i is what
    training draws at the centre of stratum i, inside --min_timestep/--max_timestep. (Rounding the midpoint
    instead of flooring it would move a DDPM t by at most one step: 166 vs 167 for n = 3.)"""
    if n < 1:
        raise UserError(f"--validation_timesteps: {n} must be at least 1")
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return engine.levels_from_u(u)


def select_levels(levels: NoiseLevels, index: Tensor) -> NoiseLevels:
    """The levels at ``index`` (one per sample of a batch)."""
    pick = lambda x: None if x is None else x[index.to(x.device)]  # noqa: E731
    return NoiseLevels(u=pick(levels.u), timesteps=pick(levels.timesteps), bins=pick(levels.bins),
                       snr=pick(levels.snr), sigma=pick(levels.sigma), sample_weight=pick(levels.sample_weight))


# ----------------------------------------------------------------------------------------------------------------
# Leaving no trace: RNG and train/eval flags
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Restore the global torch RNG (CPU, and the current CUDA device if in use) on exit, whatever ran inside."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def evaluation_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put ``modules`` in eval mode (no dropout) and restore every submodule's own train/eval flag on exit (a
    module-level .train(flag) would not: the loop keeps frozen parts in eval and the network in train)."""
    flags = [(sub, sub.training) for module in modules if module is not None for sub in module.modules()]
    try:
        for module in modules:
            if module is not None:
                module.eval()
        yield
    finally:
        for sub, training in flags:
            sub.training = training


# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------
def text_conditioning(adapter: Any, models: Any) -> Conditioning:
    """batch -> conditioning as the training loop forms it: cached text-encoder outputs when the batch has them,
    else tokenize + encode_text (under the caller's no_grad)."""
    def encode(batch: dict[str, Any]) -> dict[str, Tensor]:
        device = next(models.text_encoders[0].parameters()).device
        tokens = lambda: [t.to(device) for t in adapter.tokenize(models, batch["captions"])]  # noqa: E731
        if batch.get("text_encoder_outputs") is not None:
            cached = {k: v.to(device) for k, v in batch["text_encoder_outputs"].items()}
            # a partial cache (Flux: the trained CLIP-L runs live), as in training
            return adapter.encode_text_with_cache(models, tokens(), cached) if hasattr(
                adapter, "encode_text_with_cache") else cached
        return adapter.encode_text(models, tokens())
    return encode


# ----------------------------------------------------------------------------------------------------------------
# The set
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ValidationItem:
    index: int                               # the item's index in the dataset group: keys its noise
    latents: Tensor                          # [C, H, W] fp32, CPU
    caption: str                             # the deterministic caption
    extras: dict[str, Tensor]                # per-sample batch extras (families.batch_keys()) without the batch dim
    text_outputs: dict[str, Tensor] | None   # cached text-encoder outputs (rows), if the group has them


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def gather_records(records: Tensor, accelerator: Any | None) -> Tensor:
    """Concatenate every process's [P_r, K] records (rank order); shares may differ in length, so each pads to the
    longest with rows of −1 (pair id −1), dropped after gathering. One process: unchanged."""
    if accelerator is None or accelerator.num_processes <= 1:
        return records
    local = records.to(accelerator.device)
    sizes = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device))
    padding = int(sizes.max()) - local.shape[0]
    local = torch.nn.functional.pad(local, (0, 0, 0, padding), value=-1.0)
    gathered = accelerator.gather(local).cpu()
    return gathered[gathered[:, 0] >= 0]


@dataclass
class ValidationSet:
    """The fixed (image, level) pairs of the validation loss. Pair p = position·n + level, positions in the order
    of ``items`` (grouped by latent size)."""
    items: list[ValidationItem]
    levels: NoiseLevels                      # the n fixed levels (CPU)
    seed: int
    batch_size: int                          # pairs per forward pass (default: the dataset batch size)

    @property
    def num_levels(self) -> int:
        return int(self.levels.timesteps.shape[0])

    @property
    def num_pairs(self) -> int:
        return len(self.items) * self.num_levels

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, group: Any, adapter: Any, models: Any, engine: LossEngine, seed: int, num_levels: int = 10,
              batch_size: int | None = None, max_batches: int | None = None) -> "ValidationSet":
        """Load every validation item once (no augmentation) and fix its latents. Raises UserError when the
        group has no validation images. max_batches (KS --max_validation_steps): the first N batches only."""
        batches = group.validation_batches()[:max_batches]
        if not batches:
            raise UserError("--validate_every_n_steps/--validate_every_n_epochs: the dataset has no validation "
                            "images; set --validation_split 0.1 or add an is_val subset to the dataset TOML")
        items: list[ValidationItem] = []
        with torch.no_grad(), untouched_rng(), evaluation_mode(models.vae):
            for number, indices in enumerate(batches):
                batch = group.load_batch(indices, 1, number, augment=False)
                for position, index in enumerate(indices):
                    if batch.get("latents") is not None:
                        latents = batch["latents"][position]
                    else:  # one image at a time: its VAE sample must not depend on the batch it was loaded in
                        generator = rng.generator_for(seed, index, 0, STREAM_VALIDATION_LATENTS)
                        image = batch["images"][position:position + 1].to(_device_of(models.vae), torch.float32)
                        latents = adapter.encode_images(models, image, generator=generator)[0]
                    text = batch.get("text_encoder_outputs")
                    items.append(ValidationItem(
                        index=int(index), latents=latents.detach().float().cpu(), caption=batch["captions"][position],
                        extras={k: batch[k][position] for k in families.batch_keys() if batch.get(k) is not None},
                        text_outputs=None if text is None else {k: v[position] for k, v in text.items()}))
        items.sort(key=lambda item: tuple(item.latents.shape))  # stable: same-size items stay in dataset order
        return cls(items=items, levels=fixed_validation_levels(engine, num_levels), seed=int(seed),
                   batch_size=batch_size or max(len(b) for b in batches))

    # ------------------------------------------------------------------------------------------ pairs
    def noise(self, pair_ids: Tensor) -> Tensor:
        """ε [B, C, H, W] fp32 CPU of pairs of one latent size, each from its own (seed, item index, level) key."""
        n = self.num_levels
        return torch.stack([
            torch.randn(self.items[p // n].latents.shape,
                        generator=rng.generator_for(self.seed, self.items[p // n].index, p % n, STREAM_VALIDATION_NOISE))
            for p in pair_ids.tolist()])

    def share(self, rank: int, world_size: int) -> Tensor:
        """Pair ids of process ``rank``: p ≡ rank (mod world_size)."""
        return torch.arange(rank, self.num_pairs, world_size)

    def _chunks(self, pair_ids: Tensor, batch_size: int) -> list[Tensor]:
        """Pair ids cut into forward batches of ≤ batch_size pairs whose latents have one size."""
        sizes = [tuple(self.items[p // self.num_levels].latents.shape) for p in pair_ids.tolist()]
        chunks, start = [], 0
        for end in range(1, len(sizes) + 1):
            if end == len(sizes) or sizes[end] != sizes[start] or end - start == batch_size:
                chunks.append(pair_ids[start:end])
                start = end
        return chunks

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, adapter: Any, models: Any, engine: LossEngine, conditioning: Conditioning, step: int = 0,
                 rank: int = 0, world_size: int = 1, batch_size: int | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> Tensor:
        """Records [P_share, 3] fp64 CPU of this process's pairs: (pair id, MSE, weighted loss).

        MSE = mean over elements of (x̂ − target)² in the target's space (flow_x0: x̂0 = x_σ − σ·F); the weighted
        loss is the engine's per-sample objective (--loss_type, §4 weights at ``step``). Call under no_grad."""
        batch_size = batch_size or self.batch_size
        pair_ids = self.share(rank, world_size)
        if pair_ids.numel() == 0:
            return torch.zeros(0, 3, dtype=torch.float64)
        n = self.num_levels
        device = _device_of(models.denoiser)
        dtype = next(models.denoiser.parameters()).dtype
        # The objective without training-only input perturbation (its draws would depend on the batch).
        plain = copy.copy(engine)
        plain.cfg = dataclasses.replace(engine.cfg, ip_noise_gamma=None)

        positions = sorted({p // n for p in pair_ids.tolist()})
        rows = self._conditioning_rows(positions, conditioning, batch_size)
        records = []
        for chunk in self._chunks(pair_ids, batch_size):
            members = [self.items[p // n] for p in chunk.tolist()]
            latents = torch.stack([m.latents for m in members]).to(device)
            noise = self.noise(chunk).to(device)
            levels = LossEngine.to_device(select_levels(self.levels, chunk % n), device)
            noisy, target = plain.make_inputs(latents, noise, levels)
            cond = {k: torch.stack([rows[p // n][k] for p in chunk.tolist()]).to(device) for k in rows[positions[0]]}
            batch = {k: torch.stack([m.extras[k] for m in members]) for k in members[0].extras}
            with autocast():
                pred = adapter.predict(models, noisy.to(dtype), levels.timesteps, cond, batch)
            pred, target = pred.float(), target.float()
            squared = (prediction_to_loss_space(pred, noisy.float(), levels, engine.prediction_type) - target) ** 2
            mse = per_sample_mean(squared)
            weighted = engine.loss(pred, target, levels, step, noisy=noisy.float()).weighted
            records.append(torch.stack([chunk.double(), mse.double().cpu(), weighted.double().cpu()], dim=1))
        return torch.cat(records)

    def _conditioning_rows(self, positions: list[int], conditioning: Conditioning,
                           batch_size: int) -> dict[int, dict[str, Tensor]]:
        """Conditioning of each needed item once (the text encoders may carry LoRA: recomputed every time)."""
        rows: dict[int, dict[str, Tensor]] = {}
        for start in range(0, len(positions), batch_size):
            chosen = positions[start:start + batch_size]
            items = [self.items[i] for i in chosen]
            texts = [item.text_outputs for item in items]
            batch = {"captions": [item.caption for item in items],
                     "text_encoder_outputs": None if any(t is None for t in texts) else
                     {k: torch.stack([t[k] for t in texts]) for k in texts[0]}}
            out = conditioning(batch)
            for row, i in enumerate(chosen):
                rows[i] = {k: v[row] for k, v in out.items()}
        return rows

    def summarise(self, records: Tensor) -> dict[str, float]:
        """Means over every pair of the gathered records (any split, any order): loss/validation (MSE),
        loss/validation_weighted, loss/validation/bin_XX (MSE at level XX). Sums run in pair order in fp64, so
        the result is the same for any split of the pairs."""
        records = records[torch.argsort(records[:, 0])]
        ids = records[:, 0].long()
        if not torch.equal(ids, torch.arange(self.num_pairs)):
            raise RuntimeError(f"validation records cover {ids.unique().numel()} of {self.num_pairs} pairs "
                               f"({ids.numel()} records); every pair must be evaluated exactly once")
        mse, weighted = records[:, 1], records[:, 2]
        per_level = mse.view(len(self.items), self.num_levels).mean(0)
        logs = {"loss/validation": float(mse.mean()), "loss/validation_weighted": float(weighted.mean())}
        logs.update({f"loss/validation/bin_{k:02d}": float(v) for k, v in enumerate(per_level.tolist())})
        return logs

    def compute(self, adapter: Any, models: Any, engine: LossEngine, conditioning: Conditioning,
                accelerator: Any | None = None, step: int = 0, batch_size: int | None = None,
                network: torch.nn.Module | None = None) -> dict[str, float]:
        """The validation logs, identical on every process. Each process evaluates its share of the pairs; the
        records are gathered. No grad; denoiser, text encoders, VAE and ``network`` in eval mode; modes and the
        global RNG restored afterwards. ``accelerator`` None = one process without autocast."""
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
        modules = [models.denoiser, models.vae, *[m for m in models.text_encoders if m is not None], network]
        with torch.no_grad(), untouched_rng(), evaluation_mode(*modules):
            records = self.evaluate(adapter, models, engine, conditioning, step, rank, world, batch_size, autocast)
        return self.summarise(gather_records(records, accelerator))


# ----------------------------------------------------------------------------------------------------------------
# When (KS semantics)
# ----------------------------------------------------------------------------------------------------------------
def due_at_step(step: int, every_n_steps: int | None) -> bool:
    """KS: after optimizer step ``step`` (1-based count of steps done) when --validate_every_n_steps divides it."""
    return bool(every_n_steps) and step > 0 and step % every_n_steps == 0


def due_at_epoch_end(epoch: int, every_n_epochs: int | None) -> bool:
    """KS: at the end of (1-based) ``epoch`` when --validate_every_n_epochs divides it; without the flag, at the
    end of every epoch (when there are validation images)."""
    return every_n_epochs is None or epoch % every_n_epochs == 0

"""Counter-based random streams: every random draw of a step is a pure function of its key.

Spec §0 (../shared/spec/losses-and-timesteps.md): timesteps and noise come from a generator keyed on
(seed, global step, rank, micro step, stream), never from the global torch RNG. So a run is reproducible,
a resumed run draws exactly what the uninterrupted run drew at the same step (there is no RNG state to save),
and neither dataloader workers nor other code that touches ``torch.manual_seed`` can shift the draws.
Sample i of a batch is draw i of its key's stream.

The key is hashed with BLAKE2b (stable across processes and Python versions; Python's ``hash`` is salted per
process) into the 63-bit seed of a fresh ``torch.Generator``.
"""
from __future__ import annotations

import hashlib
import struct

import torch
from torch import Tensor

# Streams in use, named so two purposes never share draws.
STREAM_TIMESTEPS = "timesteps"      # the uniforms U the timestep sampler transforms
STREAM_WITHIN_BIN = "within_bin"    # the position inside a loss-map bin
STREAM_NOISE = "noise"              # ε, offset noise, multires noise
STREAM_IP_NOISE = "ip_noise"        # input perturbation (--ip_noise_gamma)
STREAM_CLUSTER = "cluster"          # shared: the timestep cluster of a step
STREAM_STRATIFY = "stratify"        # shared: the strata permutation of a step

_SHARED_RANK = -1  # rank slot of the rank-independent streams


def stream_seed(seed: int, step: int, rank: int, stream: str, micro_step: int = 0) -> int:
    """A stable 63-bit seed for the key (seed, step, rank, micro_step, stream)."""
    packed = struct.pack("<qqqq", int(seed), int(step), int(rank), int(micro_step)) + stream.encode("utf-8")
    digest = hashlib.blake2b(packed, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator_for(seed: int, step: int, rank: int, stream: str, device: torch.device | str | None = None,
                  micro_step: int = 0) -> torch.Generator:
    """A fresh generator for one (seed, step, rank, micro_step, stream) key, on ``device`` (CPU by default).

    The same key gives the same draws on the same device type; draws differ between device types (torch's
    CPU and CUDA generators are different algorithms)."""
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    generator.manual_seed(stream_seed(seed, step, rank, stream, micro_step))
    return generator


def shared_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator every rank builds identically (no rank in the key): for what all ranks must agree on,
    such as the timestep cluster of a step or the strata permutation."""
    return generator_for(seed, step, _SHARED_RANK, stream)


def uniforms(seed: int, step: int, rank: int, n: int, stream: str = STREAM_TIMESTEPS,
             device: torch.device | str | None = None, micro_step: int = 0) -> Tensor:
    """n uniform draws U ∈ [0, 1) in fp64 (so inverse CDFs keep their tails), on ``device``."""
    generator = generator_for(seed, step, rank, stream, device, micro_step)
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)

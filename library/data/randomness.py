"""Counter-based randomness for the data pipeline: every random choice is a function of the seed, a stream name
and counters such as (epoch, batch number, position in batch).

A generator is built from a numpy SeedSequence of those numbers, so the caption of a sample is the same whether it
is loaded in the main process, in any DataLoader worker, or after a resume; nothing depends on the global
`random` / numpy / torch state or on the order in which samples are loaded.
"""
from __future__ import annotations

import zlib

import numpy as np

_MASK = (1 << 64) - 1


def data_rng(seed: int, stream: str, *counters: int) -> np.random.Generator:
    """A generator for one cell, e.g. data_rng(seed, "caption", epoch, batch_number, position).
    The stream name (CRC32, stable across processes unlike hash()) keeps captions, crops and batch order
    independent of each other."""
    entropy = [seed & _MASK, zlib.crc32(stream.encode("utf-8"))] + [int(c) & _MASK for c in counters]
    return np.random.default_rng(entropy)

"""Keep freed host memory in the heap while training on the CPU, so a step does not page-fault its activations in.

Why: glibc's malloc serves large blocks (above a dynamic threshold of at most 32 MiB) with a fresh `mmap` and gives
them back with `munmap` on free, and trims the top of the heap when more than `M_TRIM_THRESHOLD` is free. A CPU
training step allocates and frees gigabytes of activations, so every step the kernel hands out and zeroes the same
pages again: on the full-size SD1.5 workload of bench/vs_kohya.py (256 px, one thread) that was about 620,000
minor page faults and 1.0-1.2 s of system time per 5.7 s step. With mmap off (`M_MMAP_MAX = 0`) and trimming off
(`M_TRIM_THRESHOLD = -1`, "disables trimming completely", mallopt(3)) freed blocks stay in the heap and the next
step reuses them: 0 faults per step and 4.4 s per step, with unchanged arithmetic (bit-identical results).

It is switched on once the models are loaded, so the large, one-off load buffers were mmapped and went back to the
system; latent caching then reuses its activations too (the VAE encoder at 256 px: 1.95 -> 1.53 CPU s per
picture), and the heap holds about one step's working set, which the process had at its peak anyway. Releasing
the VAE after caching (library/lean.py) still returns its memory: malloc_trim is explicit. Only on Linux with glibc, only when training runs on the CPU (GPU activations do not live in host memory);
`--return_freed_memory` keeps glibc's defaults. Same effect from outside the process, for any program:
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<large>`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl and others
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory_in_heap() -> bool:
    """Switch glibc malloc to reuse freed memory instead of returning it to the system; True if it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def trim_heap() -> None:
    """Hand the heap's free pages back to the system now (glibc malloc_trim; explicit, so it works with trimming
    switched off): after the VAE is released, after building a large model."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def apply(device_type: str, return_freed_memory: bool) -> None:
    """Called by the loop once the models are loaded: on the CPU, unless --return_freed_memory."""
    if device_type != "cpu" or return_freed_memory:
        return
    if keep_freed_memory_in_heap():
        logger.info("host memory: freed blocks stay in the heap for the next step (--return_freed_memory: off)")

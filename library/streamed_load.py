"""Streamed single-file loading: read and cast one tensor at a time, never the whole fp16 file beside the models.

    lazy_safetensors(path) -> dict[str, Tensor]   lazy meta tensors (shape, dtype) that know where their bytes are
    materialise(tensor, dtype) -> Tensor          the real values, cast to dtype (a real tensor is cast as is)
    with whole_files(): ...                       loads read whole files as before (the tests and
                                                  bench/load_memory.py compare the two)

How it works: the key converters (diffusers' single_file_utils, library/flux_convert) rename keys and, for some
weights, slice (`w[:, :, 0, 0]`, `w.chunk(3)`), copy (`.clone()`) or compute (`torch.cat([shift, scale])`). A lazy
tensor is a meta tensor of a small subclass whose __torch_function__ writes down how every tensor derived from it
was made (the op, its arguments, which output): the converters run unchanged on shapes only, and materialise()
replays the recipe on the real bytes when the model takes that one weight. A file tensor that is sliced by several
recipes (a fused qkv split into q, k, v) is read once into a two-entry cache. In-place ops on lazy tensors raise.
The replayed ops are the converters' own ops on the same file dtype, so the values are bit-identical to converting
the whole loaded state dict; the cast comes last in both.

Bytes: each tensor's own byte range of the file is mapped (private, read-only in effect) only while it is cast,
so the cast reads straight from the page cache and the mapping is gone with the tensor; mapping the whole file
would count every page touched in the process's RSS (RssFile) for as long as the mapping lives. (Reading into
buffers instead costs an extra copy, and glibc's heap kept the holes of those freed buffers resident: +1.1 GiB over
the bf16 SDXL UNet, measured.) The safetensors layout is 8 bytes of little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the data.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_flatten, tree_map

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SOURCE = "_streamed_source"   # (reader, key) for a file tensor, (func, args, kwargs, output index) for a derived one
_STREAMING = [True]             # a stack: whole_files() pushes False
_CACHED_READS = 2              # a fused tensor's q/k/v slices are taken in turn with its bias's (SD3, Flux)


class _Reader:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + length
        size = os.path.getsize(path)
        if any(self.data_start + info["data_offsets"][1] > size for info in self.header.values()):
            raise OSError(f"{path}: truncated (its header names bytes past the end of the file)")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def read(self, key: str, cache: bool = False) -> torch.Tensor:
        """The tensor as it is in the file, in a private mapping of its bytes only, unmapped when the tensor is
        freed. cache=True keeps the last few such tensors: for fused weights that several recipes slice."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        info = self.header[key]
        begin, end = (self.data_start + offset for offset in info["data_offsets"])
        if end == begin:
            raw = torch.empty(0, dtype=torch.uint8)
        else:
            page_start = begin - begin % mmap.ALLOCATIONGRANULARITY
            with open(self.path, "rb") as f:
                mapping = mmap.mmap(f.fileno(), end - page_start, access=mmap.ACCESS_COPY, offset=page_start)
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=begin - page_start)
        tensor = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if cache:
            self._cache[key] = tensor
            while len(self._cache) > _CACHED_READS:
                self._cache.popitem(last=False)
        return tensor


class LazyTensor(torch.Tensor):
    """A meta tensor that records, on every tensor derived from it, the op that made it (see the module doc)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__setitem__" or (name.endswith("_") and not name.endswith("__")):
            raise RuntimeError(f"streamed load: a key converter changes a lazily loaded weight in place ({name}), "
                               "which cannot be replayed on the file; report this with the checkpoint's name")
        out = super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for index, leaf in enumerate(tree_flatten(out)[0]):
                if isinstance(leaf, LazyTensor) and id(leaf) not in inputs and leaf.is_meta:
                    setattr(leaf, _SOURCE, (func, args, kwargs, index))
        return out


@contextlib.contextmanager
def whole_files():
    """Inside this block, single files are loaded whole (safetensors load_file), then converted and cast."""
    _STREAMING.append(False)
    try:
        yield
    finally:
        _STREAMING.pop()


def streaming() -> bool:
    return _STREAMING[-1]


def lazy_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a lazy meta tensor that materialise() can read back. Unknown dtypes
    raise KeyError (the caller falls back to an eager load)."""
    reader = _Reader(path)
    state = {}
    for key, info in reader.header.items():
        tensor = torch.Tensor._make_subclass(
            LazyTensor, torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta"))
        setattr(tensor, _SOURCE, (reader, key))
        state[key] = tensor
    return state


def _real(tensor: torch.Tensor, sliced: bool) -> torch.Tensor:
    """The values of a lazy tensor in the file's dtype (possibly a view of a larger real tensor)."""
    source = getattr(tensor, _SOURCE, None)
    if source is None:
        raise RuntimeError("streamed load: a converted weight was made from lazily loaded weights in a way that "
                           "was not recorded; report this with the checkpoint's name")
    if isinstance(source[0], _Reader):
        reader, key = source
        return reader.read(key, cache=sliced)
    func, args, kwargs, index = source
    real_args, real_kwargs = tree_map(lambda t: _real(t, True) if isinstance(t, LazyTensor) else t, (args, kwargs))
    with torch._C.DisableTorchFunctionSubclass():
        return tree_flatten(func(*real_args, **real_kwargs))[0][index]


def materialise(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The real values of `tensor` (replayed from the file when it is lazy), cast to `dtype` when it is floating
    point. A lazy tensor's result is always a copy in memory of its own (torch-allocated, so aligned): it never
    points into the file mapping, the read cache or a larger fused tensor."""
    if isinstance(tensor, LazyTensor):
        real = _real(tensor, False)
        cast = dtype if dtype is not None and real.is_floating_point() else real.dtype
        return real.to(cast, copy=True)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor

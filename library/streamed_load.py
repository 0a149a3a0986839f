"""Streamed single-file loading: read and cast one tensor at a time, never the whole fp16 file beside the models.

    lazy_safetensors(path) -> dict[str, Tensor]   meta tensors (right shape/dtype) that know where their bytes are
    materialise(tensor, dtype) -> Tensor          the real values, cast to dtype (a real tensor is cast as is)

How it works: the key converters (diffusers' single_file_utils) only rename keys, and for a few weights take a view
(`w[:, :, 0, 0]`, `w.chunk(3)`, `w[:d]`). Run on meta tensors, they return the very same tensor objects, or views
of them; each source meta tensor carries (reader, key), and a view is replayed on the real bytes with
`as_strided(size, stride, storage_offset)` of the view. A converter that computes a new tensor (torch.cat,
arithmetic) gives a meta tensor with no source: materialise raises, the caller must load eagerly for it.

Bytes are read with plain file reads (readinto), not mmap: a mapped file counts in the process's RSS (RssFile) for
as long as the mapping lives, a read goes through the page cache only. The safetensors layout is 8 bytes of
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""
from __future__ import annotations

import json
import struct

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SOURCE = "_streamed_source"


class _Reader:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + length

    def read(self, key: str) -> torch.Tensor:
        info = self.header[key]
        begin, end = info["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise OSError(f"{self.path}: truncated tensor {key}")
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def lazy_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a meta tensor that materialise() can read back. Unknown dtypes
    raise KeyError (the caller falls back to an eager load)."""
    reader = _Reader(path)
    state = {}
    for key, info in reader.header.items():
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
        setattr(tensor, _SOURCE, (reader, key))
        state[key] = tensor
    return state


def is_lazy(tensor: torch.Tensor) -> bool:
    return tensor.is_meta


def materialise(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The real values of `tensor` (read from the file when it is a lazy meta tensor or a view of one), cast to
    `dtype` when it is floating point; the result owns its memory."""
    if tensor.is_meta:
        base = tensor if hasattr(tensor, _SOURCE) else tensor._base
        source = getattr(base, _SOURCE, None) if base is not None else None
        if source is None:
            raise RuntimeError("a converted weight was computed from lazy tensors (not a view of one); load this "
                               "checkpoint eagerly")
        reader, key = source
        real = reader.read(key)
        if base is not tensor:
            real = real.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset()).clone()
        tensor = real
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor

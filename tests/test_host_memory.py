"""library/host_memory.py: after the switch, freed memory is reused without page faults (measured in a child)."""
import os
import subprocess
import sys

import pytest

from library import host_memory

_CHILD = r"""
import ctypes, resource, sys
from library import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 64 * 2**20  # an activation-sized block: above glibc's largest mmap threshold (32 MiB)

def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    libc.memset(block, 1, SIZE)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_step()
default = faults_of_one_step()
switched = host_memory.keep_freed_memory_in_heap()
faults_of_one_step()  # the first step after the switch grows the heap once
print(default, faults_of_one_step(), int(switched))
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout
    default, kept, switched = map(int, out.split())
    assert switched == 1
    assert default >= 16  # glibc's default: the block is mmapped afresh every time (16384 faults of 4 KiB pages)
    assert kept * 10 <= default  # switched: the freed block is reused from the heap
    assert kept < 64


def test_only_on_the_cpu_and_not_when_told(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory_in_heap", lambda: calls.append(1) or True)
    host_memory.apply("cuda", return_freed_memory=False)
    host_memory.apply("cpu", return_freed_memory=True)
    assert calls == []
    host_memory.apply("cpu", return_freed_memory=False)
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc only")
def test_a_run_that_keeps_freed_memory_trains_the_same_bits(sd15, dataset, tmp_path):
    """The switch changes where memory comes from, never the arithmetic: the trained LoRA is bit-identical with and
    without --return_freed_memory (separate processes: the switch is process-wide)."""
    import torch

    from tests.train_helpers import base_argv, lora_tensors, run_script

    files = {}
    for name, extra in (("kept", {}), ("returned", {"return_freed_memory": True})):
        out = str(tmp_path / name)
        result = run_script("train_network.py", base_argv(sd15, dataset, out, steps=3, **extra),
                            env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        files[name] = lora_tensors(os.path.join(out, "lora.safetensors"))
    assert files["kept"].keys() == files["returned"].keys()
    assert any(t.abs().max() > 0 for k, t in files["kept"].items() if "lora_up" in k)  # it trained
    for key, tensor in files["kept"].items():
        assert torch.equal(tensor, files["returned"][key]), key


@pytest.mark.slow
def test_the_loop_switches_once_the_models_are_loaded(sd15, dataset, tmp_path, monkeypatch):
    from library import training_loop
    from tests.train_helpers import base_argv, run_inprocess

    calls = []
    monkeypatch.setattr(host_memory, "apply", lambda device_type, returned: calls.append((device_type, returned)))
    monkeypatch.setattr(training_loop, "_cache_latents", lambda *a: calls.append("cache latents"))
    run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path), steps=1, cache_latents=True))
    assert calls == [("cpu", False), "cache latents"]

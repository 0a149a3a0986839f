"""library/host_memory.py: after the switch, freed memory is reused without page faults (measured in a child)."""
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

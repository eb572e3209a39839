"""glibc malloc tuning: big buffers come from the heap, not from fresh mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from punchgate.allocator import keep_buffers_in_heap

# Prints whether a fresh 1 MiB malloc() lies inside the process's [heap] segment.
PROBE = r"""
import ctypes, ctypes.util, sys
if sys.argv[1] == "tuned":
    from punchgate.allocator import keep_buffers_in_heap
    assert keep_buffers_in_heap()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
address = libc.malloc(1 << 20)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        print("heap" if start <= address < end else "mapping")
        break
else:
    print("mapping")
"""


def probe(mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(not keep_buffers_in_heap(), reason="needs glibc's mallopt")
def test_a_1_mib_buffer_comes_from_the_heap_once_tuned():
    assert probe("plain") == "mapping"  # glibc's default: anything over 128 KiB is mmap'ed
    assert probe("tuned") == "heap"

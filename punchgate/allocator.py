"""Keep big short-lived buffers in the heap (glibc malloc), not in fresh mappings.

The data path allocates buffers of 64-256 KiB all the time: each socket read, each
decrypted Noise message, each relayed chunk. glibc serves requests over its mmap
threshold (128 KiB to start with) with a new mapping and returns it on free, so every
such buffer costs dozens of page faults as it is first written: about 20,000 minor
faults per second on a busy relay. With the threshold at 4 MiB and the heap trimmed
only when 32 MiB lie free at its top, the same buffers are reused from the heap
(about 300 faults per second). The price is at most that much free memory kept.

Only glibc has ``mallopt`` with these parameters; elsewhere (musl, macOS) this does
nothing. Called once, at start, by :func:`punchgate.cli.run`.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_buffers_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds; True if the C library took both."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

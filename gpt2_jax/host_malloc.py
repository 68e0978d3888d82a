"""The C allocator's settings for XLA:CPU: reuse one step's host memory in the next.

XLA:CPU allocates the temporary buffers of every execution afresh and frees them at its end:
hundreds of MB per train step. glibc serves blocks that large with fresh `mmap` pages and
unmaps them on free, so every step touches new pages and the kernel faults in and zeroes
each one: at L 8, d 256 on a 2-core Xeon, 258 K page faults and 0.4 s of kernel time per
1.3 s step (BENCHMARKS.md). With one arena, no mmap'd blocks and a heap that keeps
its top GiB when it shrinks, the next step finds the same pages mapped.

`tune()` applies this through `mallopt` (Linux with glibc only). The process then keeps up to
`KEEP_BYTES` of freed memory mapped until it exits. The command-line entry points call it
first thing; a program driving gpt2_jax as a library can call it before its first jax
computation. `GPT2_JAX_HOST_MALLOC=default` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "GPT2_JAX_HOST_MALLOC"
KEEP_BYTES = 1 << 30
# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # threads' own arenas are mmap'd heaps, trimmed page by page
    (_M_MMAP_MAX, 0),  # no block gets its own mapping: all come from the heap
    (_M_TOP_PAD, KEEP_BYTES),  # grow in GiB steps, and keep a GiB when trimming
    (_M_TRIM_THRESHOLD, KEEP_BYTES),
)
_applied: list[bool] = []


def tune() -> bool:
    """Apply the settings once per process; True if glibc took them all."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get(ENV, "tuned") != "default" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            libc = None
        if hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has no such symbol
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            ok = all([mallopt(param, value) == 1 for param, value in _SETTINGS])
    _applied.append(ok)
    return ok


def tuned() -> bool:
    """Whether `tune()` has applied the settings in this process."""
    return bool(_applied and _applied[0])

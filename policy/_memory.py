"""Keep the memory the step frees for its next step, instead of handing it back to the system.

The step allocates and frees arrays of a few megabytes each (at a million blocks, an ``int64``
column is 8 MB) dozens of times per step. glibc's malloc serves allocations above its mmap
threshold with fresh mappings and gives freed memory at the top of its heap back to the system
past its trim threshold, so every step page-faults its arrays in again: in a container that
charges each page to its memory cgroup, about half of a million-block veto round's time went to
the kernel (``perf``: ``clear_page_erms``, ``exc_page_fault``, ``memcg1_commit_charge``).

``keep_freed_memory`` raises both thresholds once per process (``mallopt``): allocations up to
32 MiB come from the heap, and up to 512 MiB of freed heap stay mapped for reuse. It changes
nothing but where memory comes from (never a result). It is a no-op where the C library is not
glibc, and ``WEIGHTPOOL_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD_BYTES = 512 << 20
_TOP_PAD_BYTES = 64 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process (later calls return the first answer); True when
    they are in effect.

    Never raises: without glibc (or when turned off) the process keeps its allocator's
    defaults, which only costs time.
    """
    if os.environ.get("WEIGHTPOOL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        and mallopt(_M_TOP_PAD, _TOP_PAD_BYTES)
    )

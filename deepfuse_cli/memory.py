"""Giving freed memory back to the operating system.

Codecs (tensorstore's zstd/gzip) build their output from many small allocations. Once freed, glibc
keeps them in its heaps, so a process that encodes a 250 MiB array keeps ~250 MiB resident until the
next one reuses it, on top of whatever comes next. ``release_free_memory`` returns such pages
(``malloc_trim``) after each large tensor, so peak memory is that of one tensor at a time, as the
plan's estimate says. A no-op where the C library has no ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: tensors at least this large are followed by a trim (smaller ones leave little behind)
TRIM_AFTER_BYTES = 32 * 2**20


def _trimmer():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _trimmer()


def release_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)

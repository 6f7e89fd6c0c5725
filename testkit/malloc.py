"""The C heap's bytes in use, from glibc's ``mallinfo2()``: what OpenSSL and other C code hold.

Python's small objects live in pymalloc arenas and are not counted; its objects over 512 bytes
are (pymalloc hands them to ``malloc``). Used by the TLS stream's idle-memory test and by
``bench.idle_memory``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["malloc_in_use"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int | None:
    """Bytes allocated by ``malloc`` and not freed (``uordblks + hblkhd``); None without glibc."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)

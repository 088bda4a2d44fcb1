"""Hands back the resident pages of a read-only file mapping that another library made (Linux)."""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Callable


def _madvise() -> Callable[[int, int, int], int]:
    """libc's madvise(addr, length, advice) (AttributeError where the C library has none)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def release_mapped_pages(path: str | os.PathLike[str]) -> int:
    """Drop this process's resident pages of its read-only mappings of the file at `path`.

    The mapping stays; a page touched again is read back from the page cache, so contents
    never change, only the memory the process holds. Returns the bytes of mappings advised:
    0 where there is no /proc/self/maps, madvise or MADV_DONTNEED (not Linux).
    """
    target = os.path.realpath(path)
    try:
        advice = mmap.MADV_DONTNEED
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
        madvise = _madvise()
    except (AttributeError, OSError):
        return 0
    released = 0
    for line in lines:
        fields = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode path
        if len(fields) < 6 or fields[5] != target or "w" in fields[1]:
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if madvise(start, end - start, advice) == 0:
            released += end - start
    return released

"""Keep the memory PyTorch frees on the CPU inside the process, so that a training step's large
temporaries do not fault their pages in again at every step (glibc only).

By default glibc hands a freed block of more than about 128 KiB back to the system (``munmap``,
or trimming the top of the heap), so the next step's tensors of the same size come back as
fresh pages, each zero-filled by the kernel on first touch: about 2,400 page faults, 4 ms of a
23 ms Mackey-Glass training step (docs/speed.md), and a count that changes from run to run
with the heap's layout. :func:`keep_freed_memory` makes blocks up to 32 MiB come from the heap
and keeps up to 1 GiB free at its top, so a steady training loop reuses its pages: the process
keeps the memory of its largest step.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit systems: blocks up to it use the heap
TRIM_THRESHOLD = 2**30  # free memory kept at the top of the heap


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse (module docstring); True when it
    did, False on other C libraries and systems (nothing changes there). The `delrec` command
    line calls it at start; call it once in a training script of your own."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )

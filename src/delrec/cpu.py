"""Process settings for training on the CPU: what the `delrec` command line sets at start, and
what a training script of one's own should set first (:func:`configure`).

- **Freed memory stays in the process** (:func:`keep_freed_memory`, glibc only). By default
  glibc hands a freed block of more than about 128 KiB back to the system (``munmap``, or
  trimming the top of the heap), so the next step's tensors of the same size come back as fresh
  pages, each zero-filled by the kernel on first touch: about 2,400 page faults, 4 ms of a
  23 ms Mackey-Glass training step, and 920,000 faults, a quarter of a PS-MNIST step, whose
  `(T, B, N)` tensors are 170 MB each (docs/speed.md). Every block then comes from the heap,
  whose top is never trimmed, so a steady training loop reuses its pages: the process keeps the
  memory of its largest step (and some more, as a heap fragments: about 20 % at PS-MNIST).
- **Subnormal floats are flushed to zero** (:func:`flush_denormals`, x86 CPUs). A number
  below float32's smallest normal one (1.2e-38) costs a microcode assist, of the order of a
  hundred cycles, in every multiply-add that reads it. They arise, for one, in the PS-MNIST
  network's loss gradient: its readout sums 784 steps, the logits of a sample spread over about
  a hundred at initialisation, and the softmax's smallest probabilities (e^-94 ≈ 1e-41) reach
  the gradient of every step. The GEMMs that read it made a PS-MNIST training step 2.6 times as
  long as with flushing (docs/speed.md, "Subnormal numbers"). Flushing sets only such numbers
  to 0, far below anything a float32 sum holds next to a normal number.
  A training step on the CPU that keeps them warns once (:func:`warn_if_subnormals_kept`).
- **As many threads as the process may use** (:func:`match_threads_to_cpus`). PyTorch starts
  one thread per core it sees, but a container's CPU limit (``docker run --cpus``, a
  Kubernetes limit: a cgroup quota of CPU time) lets the process run on fewer at once; the
  extra threads then wait for each other at every parallel step. Unless ``OMP_NUM_THREADS``
  or ``MKL_NUM_THREADS`` says otherwise, the thread count is lowered to :func:`usable_cpus`.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys

import torch

from delrec import user_warnings

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NO_TRIMMING = -1  # a trim threshold of -1: the top of the heap is never given back
NO_MMAP = 0  # at most 0 blocks of their own mapping: every block comes from the heap
CGROUP_CPU_LIMIT = "/sys/fs/cgroup/cpu.max"  # "QUOTA PERIOD" or "max PERIOD" (cgroup v2)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a user's choice of thread count


def configure() -> dict[str, bool]:
    """The settings of the module docstring, for the whole process; call it at the start of a
    script, before the first multi-threaded operation (the `delrec` command line does). Which
    of them took effect: ``{"keep_freed_memory": …, "match_threads_to_cpus": …,
    "flush_denormals": …}``."""
    return {
        "keep_freed_memory": keep_freed_memory(),
        "match_threads_to_cpus": match_threads_to_cpus(),
        "flush_denormals": flush_denormals(),  # after the thread count: it checks the pool
    }


def usable_cpus() -> int:
    """How many CPUs this process can run on at once: those it may be scheduled on
    (``sched_getaffinity``), fewer where a cgroup v2 CPU quota allows less time per period
    (``⌈quota / period⌉``); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open(CGROUP_CPU_LIMIT, encoding="ascii") as limit:
            quota, period = limit.read().split()
        cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2, "max": no quota, garbage
        pass
    return max(1, cpus or 1)


def match_threads_to_cpus() -> bool:
    """Lower PyTorch's thread count to :func:`usable_cpus` where it is higher and neither
    ``OMP_NUM_THREADS`` nor ``MKL_NUM_THREADS`` is set (module docstring); True when it did."""
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return False
    cpus = usable_cpus()
    if torch.get_num_threads() <= cpus:
        return False
    torch.set_num_threads(cpus)
    return True


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse (module docstring); True when it
    did, False on other C libraries and systems (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, NO_MMAP)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, NO_TRIMMING)
    )


def flush_denormals() -> bool:
    """Flush subnormal float inputs and results to zero on this thread and on PyTorch's worker
    threads (module docstring); True when every thread of the intra-op pool flushes.

    The flag is per thread and a new thread copies it from the thread that starts it, so it
    reaches the workers only when it is set before PyTorch starts them (its first
    multi-threaded operation); ``torch.set_num_threads`` may be called before or after. False,
    with nothing changed, on CPUs where PyTorch cannot set it (it supports x86 with SSE3);
    False with a warning when some worker started earlier and keeps subnormals."""
    if not torch.set_flush_denormal(True):
        return False
    threads = torch.get_num_threads()
    if threads == 1:
        return True
    # a product PyTorch splits over the pool (above its grain size, 32,768 elements, per
    # thread): a worker that keeps subnormals leaves non-zero bits
    if not _subnormals_kept(threads * 65536):
        return True
    user_warnings.warn(
        "delrec: subnormal floats are flushed on this thread but not on all of PyTorch's "
        "worker threads, which started before delrec.cpu.flush_denormals() was called; call "
        "it (or delrec.cpu.configure()) at the start of the script, before the first "
        "multi-threaded operation, or train with one thread",
        RuntimeWarning,
    )
    return False


def _subnormals_kept(elements: int) -> bool:
    """Whether ``elements`` copies of the smallest subnormal times 1 leave any non-zero bits:
    made from their bits and checked by their bits (a float conversion or comparison here would
    itself flush them); a product of more than 32,768 elements per thread is split over
    PyTorch's pool."""
    smallest = torch.ones(elements, dtype=torch.int32).view(torch.float32)
    return bool((smallest * 1.0).view(torch.int32).any())


class SubnormalWarning(RuntimeWarning):
    """A delrec network trains on a CPU thread that keeps subnormal floats (module docstring)."""


_subnormals_checked = False  # warn_if_subnormals_kept looks once per process


def warn_if_subnormals_kept() -> None:
    """At its first call in the process, a :class:`SubnormalWarning` if this thread keeps
    subnormal floats on an x86 CPU, where :func:`flush_denormals` would flush them (a training
    loop of one's own that did not call :func:`configure`); nothing at later calls or elsewhere.
    The delrec layers call it when a training step (a forward that records gradients) starts on
    the CPU."""
    global _subnormals_checked
    if _subnormals_checked:
        return
    _subnormals_checked = True
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return  # PyTorch flushes them on x86 only: nothing to advise elsewhere
    if not _subnormals_kept(1):  # on this thread alone
        return
    user_warnings.warn(
        "delrec: this thread keeps subnormal floats, which cost a microcode assist in every "
        "multiply-add that reads them; a training step whose gradients underflow (the PS-MNIST "
        "network's) then runs several times as long (2.8-5.4 times in delrec bench --network "
        "psmnist). Call delrec.cpu.configure() at the start of "
        "the script, before the first multi-threaded operation (the delrec command line and "
        "delrec.training do), or silence this with warnings.filterwarnings('ignore', "
        "category=delrec.cpu.SubnormalWarning)",
        SubnormalWarning,
    )

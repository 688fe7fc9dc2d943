"""Benchmarks of state: backward memory of truncated BPTT against the chunk length
(``delrec bench --tbptt``) and the latency of streaming inference (``delrec bench --streaming``).

Every figure is measured in this process, side by side, and printed with the command that
reproduces it; targets get a PASS/FAIL line.
"""

from __future__ import annotations

import torch


def peak_saved_bytes(run) -> int:
    """The most bytes of distinct storages that autograd holds for backward at any one time
    while ``run()`` executes (a storage counts while a saved tensor of it is alive)."""
    live: dict[int, list[int]] = {}  # storage address -> [saved tensors alive, bytes]
    held = {"now": 0, "peak": 0}

    class Saved:
        __slots__ = ("tensor", "key")

        def __init__(self, tensor):
            storage = tensor.untyped_storage()
            self.tensor, self.key = tensor, storage.data_ptr()
            entry = live.setdefault(self.key, [0, storage.nbytes()])
            if entry[0] == 0:
                held["now"] += entry[1]
                held["peak"] = max(held["peak"], held["now"])
            entry[0] += 1

        def __del__(self):
            entry = live[self.key]
            entry[0] -= 1
            if entry[0] == 0:
                held["now"] -= entry[1]
                del live[self.key]

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        run()
    return held["peak"]

"""Synaptic delays by shifted reads (``delrec.engine.synaptic``) next to the axonal fast engine.

    python benchmarks/bench_synaptic.py [--size 512] [--batch 32] [--steps 100]
        [--max-delay 10] [--sigma 10] [--threads 1 0] [--repeats 7]
        [--paths axonal rings lag-gemm] [--clock wall|cpu]

One training step (forward + backward of one float32 layer, delays ~ U(0, max-delay), shared
spread σ) is timed for each path in turn, repeated, and the median kept, so that the ratios
are measured side by side on a shared machine:

* ``axonal``: ``DelRec(N, LIF(), delay_type="axonal")`` (the fast engine, C++ time loops);
* ``rings``: ``DelRec(N, LIF(), delay_type="synaptic")``, which runs the shifted reads of class
  rings (:mod:`delrec.engine.synaptic`, path ``cpp-synaptic``);
* ``lag-gemm``: the same layer with ``DELREC_NATIVE=0``: the fallback without C++ kernels,
  one GEMM of width ``lags·N`` per step (slow at long delay ranges: leave it out with
  ``--paths axonal rings``).

``--threads 0`` means torch's default number of threads; ``--clock cpu`` times this process's
CPU time (steadier on a machine shared with other jobs). Printed with each configuration: the
classes per neuron (at most 4, whatever the delay range), the slots (levels in use) per neuron,
which grow with the delay range, and the depth of the rings.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

import torch

from delrec.bench import median_times
from delrec.engine import native
from delrec.engine.lif import width_vector
from delrec.engine.synaptic import _SlotPlan
from delrec.layers import DelRec
from delrec.neurons import LIF

PATHS = ("axonal", "rings", "lag-gemm")


def step_timers(size: int, batch: int, steps: int, max_delay: float, sigma: float, paths):
    """Zero-argument functions, one per path, each running forward + backward once, and the
    synaptic layer's plan."""
    g = torch.Generator().manual_seed(0)
    layers = {
        kind: DelRec(
            size,
            LIF(),
            delay_type=kind,
            delay_init=f"uniform:0:{max_delay}",
            sigma=sigma,
            generator=g,
        )
        for kind in ("axonal", "synaptic")
    }
    current = (torch.rand(steps, batch, size, generator=g) * 1.2).requires_grad_()
    synaptic = layers["synaptic"]

    def layer_step(layer):
        return lambda: layer(current).sum().backward()

    def lag_gemm():
        with mock.patch.dict(os.environ, {"DELREC_NATIVE": "0"}):
            synaptic(current).sum().backward()

    delay, width = synaptic.delays_and_width()
    plan = _SlotPlan(delay, width_vector(width, delay, size), native.build("synaptic"))
    timers = {"axonal": layer_step(layers["axonal"]), "rings": layer_step(synaptic)}
    timers["lag-gemm"] = lag_gemm
    return {name: timers[name] for name in paths}, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-delay", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=10.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    native.build("synaptic")
    native.build("axonal")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    paths = ["axonal", *(p for p in args.paths if p != "axonal")]  # the baseline first
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        timers, plan = step_timers(
            args.size, args.batch, args.steps, args.max_delay, args.sigma, paths
        )
        print(
            f"N={args.size} B={args.batch} T={args.steps} delays~U(0, {args.max_delay:g}) "
            f"sigma={args.sigma:g} float32 threads={torch.get_num_threads()} "
            f"classes/neuron={plan.levels.shape[0] / args.size:.1f} "
            f"slots/neuron={plan.slot_level.numel() / args.size:.1f} ring depth={plan.depth} "
            f"repeats={args.repeats} clock={args.clock}"
        )
        med = median_times(timers, args.repeats, clock)
        for name, seconds in med.items():
            print(f"  {name:9s} {seconds * 1e3:8.1f} ms   {seconds / med['axonal']:5.2f}x axonal")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()

"""Spike products against the dense product: one ``Linear`` layer on spikes, forward and
weight gradient, at a range of spike densities, and where the sparse path pays.

    python benchmarks/bench_spike_products.py [--rows 25600] [--layers 140:256 256:256 256:20]
        [--densities 0.02 0.05 0.1 0.15 0.2 0.3 0.4] [--threads 1] [--repeats 7] [--out FILE]

For each layer ``I:O`` and density, ``delrec.engine.fused.linear`` (over the non-zero inputs;
its width, row and density limits lifted, so that it runs everywhere) and ``F.linear`` are timed
side by side (alternately, CPU time, median): the forward and the weight gradient on
``--rows`` rows of random spikes (``T·B``: 25,600 is SHD's 100 steps of 256), the input not
requiring a gradient. Prints the times, their ratio, the density where the dense product
becomes the faster one, and PASS/FAIL: the path the library chooses (``fused.MIN_OUTPUTS``
outputs and ``fused.MIN_ROWS`` rows or more, at most ``fused.MAX_DENSITY`` non-zero) is never
the slower one at the densities measured. ``--out``: also write the printed log, headed by the
command line, to ``FILE`` (``docs/speed/spike-products.txt`` is that file).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from unittest import mock

import torch
from torch.nn import functional as F

from delrec import cpu, files
from delrec.bench import Log, cpu_name, median_times
from delrec.engine import fused, native


def layer_timers(rows: int, inputs: int, outputs: int, density: float):
    """Forward + weight gradient of the sparse and the dense product on the same spikes."""
    g = torch.Generator().manual_seed(0)
    spikes = (torch.rand(rows, inputs, generator=g) < density).float()
    weight = torch.randn(outputs, inputs, generator=g).requires_grad_()
    grad_out = torch.randn(rows, outputs, generator=g)

    def timer(product):
        def run():
            torch.autograd.grad(product(spikes, weight), weight, grad_out)

        return run

    return {"sparse": timer(fused.linear), "dense": timer(F.linear)}


def positive(text: str) -> int:
    """A count of at least 1 (argparse type)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return int(text)


def layer_shape(text: str) -> tuple[int, int]:
    """``I:O``, inputs and outputs of a layer (argparse type)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"a layer is INPUTS:OUTPUTS, such as 256:256; got {text!r}"
        )
    return int(parts[0]), int(parts[1])


def share(text: str) -> float:
    """A share of non-zero inputs in (0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"a density is a share in (0, 1], such as 0.1; got {text!r}"
        )
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive, default=25_600, help="T·B rows (default: SHD's)")
    parser.add_argument(
        "--layers",
        nargs="+",
        type=layer_shape,
        default=[(140, 256), (256, 256), (256, 20)],
        help="I:O shapes",
    )
    parser.add_argument(
        "--densities", nargs="+", type=share, default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    )
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--repeats", type=positive, default=7)
    parser.add_argument("--out", help="also write the log to this file")
    args = parser.parse_args()
    log = Log()
    if native.load("fused") is None:
        print("the C++ kernels 'fused' are not built: nothing to measure")
        return 1
    torch.set_num_threads(args.threads)
    cpu.configure()  # the process settings of the `delrec` command line
    log("$ python " + shlex.join(["benchmarks/bench_spike_products.py", *sys.argv[1:]]))
    log(
        f"fused.linear against F.linear: forward + weight gradient, {args.rows} rows, float32, "
        f"torch {torch.__version__}, {args.threads} thread(s), CPU {cpu_name()}, CPU time, "
        f"median of {args.repeats}"
    )
    log(f"{'layer':>9s} {'density':>8s} {'sparse ms':>10s} {'dense ms':>9s} {'ratio':>6s}")
    verdicts = []
    for inputs, outputs in args.layers:
        layer = f"{inputs}:{outputs}"
        break_even = None
        for density in sorted(args.densities):
            with (  # the sparse path everywhere
                mock.patch.object(fused, "MIN_OUTPUTS", 1),
                mock.patch.object(fused, "MIN_ROWS", 0),
                mock.patch.object(fused, "MAX_DENSITY", 1.0),
            ):
                timed = median_times(
                    layer_timers(args.rows, inputs, outputs, density),
                    args.repeats,
                    time.process_time,
                )
            ratio = timed["sparse"] / timed["dense"]
            if ratio > 1 and break_even is None:
                break_even = density
            chosen = (
                outputs >= fused.MIN_OUTPUTS
                and args.rows >= fused.MIN_ROWS
                and density <= fused.MAX_DENSITY
            )
            verdicts.append(not chosen or ratio <= 1)
            log(
                f"{layer:>9s} {density:8.2f} {timed['sparse'] * 1e3:10.2f} "
                f"{timed['dense'] * 1e3:9.2f} {ratio:6.2f}" + ("  (chosen)" if chosen else "")
            )
        where = f"from {break_even:.2f} on" if break_even is not None else "nowhere measured"
        log(f"{layer:>9s}: the dense product is the faster one {where}")
    ok = all(verdicts)
    log(
        f"{'PASS' if ok else 'FAIL'} the spike products run only where they are the faster "
        f"product (≥ {fused.MIN_OUTPUTS} outputs, ≥ {fused.MIN_ROWS} rows, "
        f"≤ {fused.MAX_DENSITY:.0%} non-zero)"
    )
    if args.out:
        files.write_text(args.out, "\n".join(log.lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

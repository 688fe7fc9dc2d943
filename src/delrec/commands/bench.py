"""`delrec bench`: the cost of recurrent delays on this machine (:mod:`delrec.bench`), or of a
preset's whole network (``--network``, :mod:`delrec.bench_network`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from delrec import bench, bench_gpu, bench_network, bench_state, files
from delrec.commands import EXIT_CODES_HELP, UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and memory of the recurrent-delay layer vs baselines (Fig. S1)",
        description="Reproduce the four panels of Fig. S1 (time per training step and memory "
        "vs hidden size and vs maximum delay) on this machine, print the ratios and the "
        "targets, and write bench.csv, bench.md, bench.txt and (with the size or delay "
        "section) bench.png into --out. --network writes network-bench.*, --device cuda "
        "gpu-bench.*, --streaming streaming.md, --tbptt tbptt.md.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--quick", action="store_true", help="small grid, about a minute of CPU time")
    p.add_argument(
        "--network",
        choices=(*bench_network.PRESETS, "all"),
        help="instead: one training step of this preset's whole network, fused and unfused, "
        "and where its time goes, on the CPU (delrec.bench_network; --quick: batch 16)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="with --network: first scale each hidden layer's input current until it fires R "
        "spike events per neuron and step (e.g. 0.05), as a trained network does; by default "
        "the preset's fresh weights, whose layers may be silent (SSC's are), which makes the "
        "fused step's spike products cost nothing",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): this benchmark; cuda: the Triton engine on a GPU against a lean "
        "PyTorch recurrent loop, with the GPU targets (delrec.bench_gpu)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: run the GPU benchmark at tiny sizes on the CPU under Triton's "
        "interpreter (checks it end to end without a GPU; measures nothing)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=bench.SECTIONS,
        default=None,
        metavar="SECTION",
        help="run only these sections of the CPU benchmark (default: all), with their targets: "
        + ", ".join(bench.SECTIONS)
        + " (e.g. --sections feedforward: the feedforward-delay rows and targets alone)",
    )
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per model, median kept (default on the CPU 3 with --quick, else 5; "
        "on a GPU 5; 1 with --dry-run)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: reproducible, and no spinning threads on a shared machine)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time, or this process's CPU time (steadier on a shared machine)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--streaming",
        action="store_true",
        help="instead: per-step latency and chunk throughput of streaming the SHD network",
    )
    which.add_argument(
        "--tbptt",
        action="store_true",
        help="instead: backward memory and time of truncated BPTT against the chunk length",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_counts_and_out(args)
    if args.sections and (args.network or args.streaming or args.tbptt or args.device != "cpu"):
        raise UsageError(
            "--sections picks sections of the CPU layer benchmark: leave out --network, "
            "--streaming, --tbptt and --device cuda"
        )
    if args.rate is not None and not args.network:
        raise UsageError("--rate sets the firing rate of --network's step: use it with --network")
    if args.network:
        if args.rate is not None and not 0 < args.rate <= bench_network.MAX_RATE:
            raise UsageError(
                f"--rate is spike events per neuron and step, in (0, {bench_network.MAX_RATE:g}]; "
                f"got {args.rate:g}"
            )
        if args.streaming or args.tbptt:
            raise UsageError("--network, --streaming and --tbptt are separate benchmarks: give one")
        if args.device != "cpu" or args.dry_run:
            raise UsageError("--network measures the CPU engines: leave out --device and --dry-run")
        return bench_network.run(args)
    if args.dry_run and args.device != "cuda":
        raise UsageError("--dry-run checks the GPU benchmark: use it with --device cuda")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA device here; --dry-run runs the GPU benchmark at tiny sizes "
            "on the CPU to check it"
        )
    if args.streaming or args.tbptt:
        if args.device != "cpu":
            raise UsageError("--streaming and --tbptt measure on the CPU: drop --device cuda")
        if args.quick:
            raise UsageError("--streaming and --tbptt have one size, no quick grid: drop --quick")
        return bench_state.run(args)
    if args.device == "cuda":
        if args.threads != 1 or args.clock != "wall":
            raise UsageError(
                "--device cuda times the GPU by wall clock: leave out --threads and --clock"
            )
        return bench_gpu.run(args)
    return bench.run(args)


def _check_counts_and_out(args: argparse.Namespace) -> None:
    """Repeats, threads and the output folder, checked before anything is measured."""
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats} (leave it out: the default)")
    cores = os.cpu_count() or 1
    if not 1 <= args.threads <= cores:
        raise UsageError(
            f"--threads must be in 1…{cores} (this machine's cores), got {args.threads}"
        )
    if not args.out:  # Path("") would be the working directory
        raise UsageError("--out is empty: give the folder to write into (default bench-out)")
    out = Path(args.out)
    blocking = files.file_in_the_way(out)
    if blocking is not None:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder")
    broken = next((p for p in (out, *out.parents) if p.is_symlink() and not p.exists()), None)
    if broken is not None:
        raise UsageError(
            f"--out {out}: {broken} is a broken symbolic link (to {os.readlink(broken)}); "
            "remove it or give another folder"
        )
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." at the least
    try:  # a file made and removed where the folder is or will be: nothing left behind
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UsageError(
            f"--out {out} cannot be written ({error.strerror or error}): give a folder this user "
            "may write"
        ) from None

"""`delrec bench`: the cost of recurrent delays on this machine (:mod:`delrec.bench`)."""

from __future__ import annotations

from delrec import bench
from delrec.commands import EXIT_CODES_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and memory of the recurrent-delay layer vs baselines (Fig. S1)",
        description="Reproduce the four panels of Fig. S1 (time per training step and memory "
        "vs hidden size and vs maximum delay) on this machine, print the ratios and the "
        "targets, and write bench.csv, bench.png and bench.txt.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--quick", action="store_true", help="small grid, under a minute")
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per model, median kept (default 3 with --quick, else 5)",
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


def run(args) -> int:
    if args.streaming or args.tbptt:
        from delrec import bench_state

        return bench_state.run(args)
    return bench.run(args)

"""`delrec bench`: the cost of recurrent delays on this machine (:mod:`delrec.bench`), or of a
preset's whole network (``--network``, :mod:`delrec.bench_network`)."""

from __future__ import annotations

from delrec import bench, bench_network
from delrec.commands import EXIT_CODES_HELP


def run(args) -> int:
    """The engine benchmark, or with ``--network`` the whole-network one."""
    return bench_network.run(args) if args.network else bench.run(args)


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
    p.add_argument(
        "--network",
        choices=("shd", "ssc", "psmnist", "mackey-glass", "all"),
        help="instead: one training step of this preset's whole network, fused and unfused, "
        "and where its time goes (delrec.bench_network; --quick: batch 16)",
    )
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
    p.set_defaults(run=run)

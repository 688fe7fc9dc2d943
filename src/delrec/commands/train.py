"""`delrec train`: train a preset (default: Mackey-Glass with learned delays), resume a run,
or run several seeds (one after another, or side by side with ``--parallel``); under
``torchrun`` one run is trained by several processes (docs/distributed.md).
Human-readable progress on stderr, one JSON summary line on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from delrec.commands import EXIT_CODES_HELP, UsageError, add_set_option, fail, nonempty, parse_seeds
from delrec.config import (
    TASKS,
    given_settings,
    ignored_notes,
    load_config_file,
    parse_override,
    resolve,
)
from delrec.models import MODELS
from delrec.runs import RunDir
from delrec.training import jobs
from delrec.training.distributed import (
    DEFAULT_TIMEOUT_S,
    check_timeout,
    rank_label,
    resume_command,
    world_size,
)
from delrec.training.parallel_seeds import PARENT_VARIABLE, end_with_parent

# the settings --set may change on --resume (where the run runs, not what it computes; --device
# and --data-root are the others of config.RESUME_OVERRIDABLE)
ON_RESUME = ("threads", "num_workers")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a network (default: Mackey-Glass forecasting with learned delays)",
        description="Train a spiking network from a preset, a config file and overrides. "
        "Presets: " + ", ".join(TASKS) + ". Without arguments: Mackey-Glass (τ=30, H=20), "
        "DelRec, a few minutes on a laptop CPU. One process at a time trains in a run "
        "directory: a second `delrec train` into it (or `--resume` of it) stops at once "
        "with exit code 2, naming the process that holds it (RUN_DIR/run.lock); the lock "
        "of a process that died is taken over.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--task", choices=TASKS, help="preset / data set (default mackey-glass)")
    parser.add_argument("--model", choices=MODELS, help="network family (default delrec)")
    parser.add_argument(
        "--config",
        type=nonempty(Path),
        metavar="FILE",
        help="TOML or JSON file of settings (applied over the preset)",
    )
    add_set_option(
        parser,
        "override settings, e.g. --set optim.lr=1e-3 network.hidden_sizes=[64,64] data.tau=17",
    )
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="random seed (default 0)")
    seeds.add_argument(
        "--seeds",
        metavar="SPEC",
        help="several seeds, e.g. 0-4 or 0,3,7: one run each, then mean ± std",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        metavar="K",
        help="with --seeds: run K seeds at once as separate processes (one GPU "
        "each when there are GPUs)",
    )
    parser.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--data-root", help="folder of the data set's files")
    parser.add_argument(
        "--run-dir", type=nonempty(Path), help="run directory (default runs/<task>-<model>-<time>)"
    )
    parser.add_argument(
        "--resume",
        type=nonempty(Path),
        metavar="RUN_DIR",
        help="continue an interrupted run (its config.json is used; of --set, only threads "
        "and num_workers may change: where it runs, not what it computes)",
    )
    parser.add_argument(
        "--max-epochs-this-run",
        type=int,
        metavar="N",
        help="stop after N epochs of this invocation (resume later): of all seeds together "
        "with --seeds, of each seed with --parallel",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none where stderr is not a terminal)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
    )
    parser.add_argument(
        "--dist-backend",
        choices=["gloo", "nccl", "mpi"],
        help="under torchrun: torch.distributed backend (default nccl on CUDA, gloo on the CPU)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for a "
        f"silent one before the run stops (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.set_defaults(run=run, after_termination=after_termination)


def run(args: argparse.Namespace) -> int:
    seed_of_parallel = end_with_parent()  # then stop when the parent is gone
    try:
        summary = _train(args, notes=not seed_of_parallel)
    except Exception as error:
        return fail("train", error, rank_label())
    if summary is None:  # --print-config, or a rank other than 0 of a distributed run
        return 0
    print(json.dumps(summary), flush=True)
    return 1 if summary["status"] == "failed" else 0


def after_termination(args: argparse.Namespace) -> str:
    """How this ``delrec train`` goes on after SIGTERM (``delrec.cli``): the command that
    continues its run (the parent run of several seeds, with ``--parallel`` as given), or, when
    nothing of the run was written yet, the same command again."""
    if PARENT_VARIABLE in os.environ:
        return "its --parallel parent names the command that continues the run"
    run_dir, processes = args.resume or args.run_dir, world_size()
    if run_dir is None:  # under torchrun, where the ranks chose the folder together
        command = resume_command(Path("RUN_DIR"), processes)
        return f"the run continues with `{command}` (RUN_DIR: the folder its first line named)"
    run = RunDir(run_dir)
    if not (run.is_single() or run.is_multi_seed()):
        return "nothing of the run was written yet: run the same command again"
    if processes > 1:
        return f"the run continues with `{resume_command(Path(run_dir), processes)}`"
    parallel = f" --parallel {args.parallel}" if args.parallel else ""
    return f"the run continues with `delrec train --resume {run_dir}{parallel}`"


def _check_launch(args: argparse.Namespace) -> None:
    if args.max_epochs_this_run is not None and args.max_epochs_this_run < 1:
        raise UsageError("--max-epochs-this-run must be >= 1")
    check_timeout(args.dist_timeout)  # whichever path the run takes
    processes = world_size()
    if args.dist_backend is not None and processes <= 1:
        raise UsageError(
            f"--dist-backend {args.dist_backend} applies under torchrun only, which this "
            "process was not started by: drop it, or start the command with torchrun"
        )
    if args.parallel is not None:
        if args.parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
        if processes > 1:
            raise UsageError("--parallel starts its own processes; run it without torchrun")
        if args.seeds is None and args.resume is None:
            raise UsageError(
                "--parallel K runs the seeds of --seeds side by side; give --seeds too"
            )
    if processes > 1 and args.seeds is not None:
        raise UsageError(
            "under torchrun the processes share each batch of one seed; launch "
            "one seed per torchrun, or use --seeds … --parallel K without torchrun"
        )


def _train(args: argparse.Namespace, notes: bool = True) -> dict | None:
    """Run the command; ``notes``: print the notes on given settings the model does not use,
    and the command that continues a run stopped early (not in a seed of ``--parallel``,
    whose parent printed them, whose configuration file gives every setting and whose parent
    run is the one to continue)."""
    _check_launch(args)
    distributed = {"dist_backend": args.dist_backend, "dist_timeout_s": args.dist_timeout}
    if args.resume is not None:
        _check_resume(args)
        changes = dict(parse_override(item) for item in args.overrides)
        return jobs.resume(
            args.resume,
            device=args.device,
            data_root=args.data_root,
            **{name: changes.get(name) for name in ON_RESUME},
            parallel=args.parallel,
            progress=not args.no_progress,
            max_epochs_this_run=args.max_epochs_this_run,
            hint=notes,
            **distributed,
        )
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    file_values = load_config_file(args.config) if args.config else None
    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "data_root": args.data_root,
    }
    config = resolve(args.task, args.model, file_values, args.overrides, flags)
    given = given_settings(file_values, args.overrides, flags) if notes else {}
    for note in ignored_notes(config, given):
        print(note, file=sys.stderr)
    if args.print_config:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once
            print(json.dumps(config.to_dict(), indent=2))
        return None
    if args.run_dir is None and (seeds is not None or world_size() <= 1):
        args.run_dir = jobs.default_run_dir(config)  # known to after_termination too
    if seeds is None:
        return jobs.train_run(
            config,
            args.run_dir,
            progress=not args.no_progress,
            max_epochs_this_run=args.max_epochs_this_run,
            hint=notes,
            **distributed,
        )
    if args.parallel is not None:
        return jobs.train_seeds_parallel(
            config, seeds, args.run_dir, args.parallel, args.max_epochs_this_run
        )
    return jobs.train_seeds(
        config, seeds, args.run_dir, args.max_epochs_this_run, not args.no_progress
    )


def _check_resume(args: argparse.Namespace) -> None:
    fixed = {
        "--task": args.task,
        "--model": args.model,
        "--config": args.config,
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--seed": args.seed,
        "--seeds": args.seeds,
        "--run-dir": args.run_dir,
        "--print-config": args.print_config or None,  # the run's own: RUN_DIR/config.json
    }
    given = [flag for flag, value in fixed.items() if value not in (None, [])]
    given += [f"--set {item}" for item in args.overrides if _setting(item) not in ON_RESUME]
    if given:
        raise UsageError(
            f"--resume continues a run with its own configuration; drop {', '.join(given)} "
            f"(only --device, --data-root and --set {'/'.join(ON_RESUME)} may change)"
        )


def _setting(item: str) -> str:
    return item.partition("=")[0].strip()

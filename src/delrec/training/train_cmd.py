"""`delrec train`: train a preset (default: Mackey-Glass with learned delays), resume a run,
or run several seeds (one after another, or side by side with ``--parallel``); under
``torchrun`` one run is trained by several processes (docs/distributed.md).
Human-readable progress on stderr, one JSON summary line on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from delrec.checkpoint import CheckpointError
from delrec.data import DataError
from delrec.models import MODELS
from delrec.training.config import TASKS, ConfigError, TrainConfig, load_config_file, resolve
from delrec.training.distributed import (
    DEFAULT_TIMEOUT_S,
    Stopped,
    failure_message,
    is_process_failure,
    process_group,
    rank_label,
    world_size,
)
from delrec.training.loop import Trainer, TrainingError
from delrec.training.parallel_seeds import run_seed_processes


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a network (default: Mackey-Glass forecasting with learned delays)",
        description="Train a spiking network from a preset, a config file and overrides. "
        "Presets: " + ", ".join(TASKS) + ". Without arguments: Mackey-Glass (τ=30, H=20), "
        "DelRec, a few minutes on a laptop CPU.",
    )
    parser.add_argument("--task", choices=TASKS, help="preset / data set (default mackey-glass)")
    parser.add_argument("--model", choices=MODELS, help="network family (default delrec)")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML or JSON file of settings (applied over the preset)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override settings, e.g. --set optim.lr=1e-3 network.hidden_sizes=[64,64] data.tau=17",
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
        "--run-dir", type=Path, help="run directory (default runs/<task>-<model>-<time>)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run (its config.json is used)",
    )
    parser.add_argument(
        "--max-epochs-this-run",
        type=int,
        metavar="N",
        help="stop after N epochs of this invocation (resume later)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
    )
    parser.add_argument(
        "--dist-backend",
        metavar="NAME",
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
    parser.set_defaults(run=run)


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,3,7"``; ``"0-2,9"``."""
    seeds = []
    try:
        for part in spec.split(","):
            low, dash, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high) + 1) if dash else [int(low)])
    except ValueError:
        raise ConfigError(f"--seeds expects a list like 0-4 or 0,3,7, got {spec!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {spec!r} must name distinct non-negative seeds")
    return seeds


def run(args: argparse.Namespace) -> int:
    try:
        summary = _train(args)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"delrec train: error: {rank_label()}{error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"delrec train: error: {rank_label()}{error}", file=sys.stderr)
        return 1
    if summary is None:  # --print-config, or a rank other than 0 of a distributed run
        return 0
    print(json.dumps(summary), flush=True)
    return 1 if summary["status"] == "failed" else 0


def _check_launch(args: argparse.Namespace) -> None:
    if args.max_epochs_this_run is not None and args.max_epochs_this_run < 1:
        raise ConfigError("--max-epochs-this-run must be >= 1")
    processes = world_size()
    if args.parallel is not None:
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
        if processes > 1:
            raise ConfigError("--parallel starts its own processes; run it without torchrun")
        if args.seeds is None and args.resume is None:
            raise ConfigError(
                "--parallel K runs the seeds of --seeds side by side; give --seeds too"
            )
    if processes > 1 and args.seeds is not None:
        raise ConfigError(
            "under torchrun the processes share each batch of one seed; launch "
            "one seed per torchrun, or use --seeds … --parallel K without torchrun"
        )


def _distributed_run(
    config: TrainConfig, run_dir: Path | None, args: argparse.Namespace, resume: bool
) -> dict | None:
    """One run, by this process alone or with the others torchrun started; a run directory of
    ``None`` is chosen by rank 0."""
    with process_group(config.device, args.dist_backend, args.dist_timeout) as dist:
        if run_dir is None:
            run_dir = _default_run_dir(config)
            if dist is not None:
                run_dir = dist.agree(run_dir)
        if not resume:
            _check_new_run_dir(run_dir)
        try:
            trainer = Trainer(config, run_dir, progress=not args.no_progress, dist=dist)
            return train_one(trainer, args.max_epochs_this_run, resume=resume)
        except (RuntimeError, Stopped) as error:
            if dist is None or isinstance(error, TrainingError) or not is_process_failure(error):
                raise
            raise TrainingError(failure_message(error, run_dir, dist.world_size)) from None


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty; pick "
            f"another --run-dir or continue it with --resume {run_dir}"
        )


def _train(args: argparse.Namespace) -> dict | None:
    _check_launch(args)
    if args.resume is not None:
        return _resume(args)
    seeds = parse_seeds(args.seeds) if args.seeds else None
    config = resolve(
        task=args.task,
        model=args.model,
        file_values=load_config_file(args.config) if args.config else None,
        overrides=args.overrides,
        flags={
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": args.device,
            "data_root": args.data_root,
        },
    )
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return None
    if seeds is None:
        return _distributed_run(config, args.run_dir, args, resume=False)
    run_dir = args.run_dir or _default_run_dir(config)
    _check_new_run_dir(run_dir)
    if args.parallel is not None:
        return train_seeds_parallel(config, seeds, run_dir, args.parallel, args.max_epochs_this_run)
    return train_seeds(config, seeds, run_dir, args.max_epochs_this_run, not args.no_progress)


def _resume(args: argparse.Namespace) -> dict:
    fixed = {
        "--task": args.task,
        "--model": args.model,
        "--config": args.config,
        "--set": args.overrides,
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--seed": args.seed,
        "--seeds": args.seeds,
        "--run-dir": args.run_dir,
    }
    given = [flag for flag, value in fixed.items() if value not in (None, [])]
    if given:
        raise ConfigError(
            f"--resume continues a run with its own configuration; drop {', '.join(given)}"
        )
    run_dir = args.resume
    changes = {"device": args.device, "data_root": args.data_root}
    if (run_dir / "config.json").is_file():
        if args.parallel is not None:
            raise ConfigError(f"{run_dir} is a single run; --parallel resumes a run of --seeds")
        config = _with_changes(json.loads((run_dir / "config.json").read_text())["config"], changes)
        return _distributed_run(config, run_dir, args, resume=True)
    if (run_dir / "seeds.json").is_file():
        if world_size() > 1:
            raise ConfigError(
                f"{run_dir} holds several seeds; resume it without torchrun "
                "(--parallel K runs them side by side)"
            )
        document = json.loads((run_dir / "seeds.json").read_text())
        config = _with_changes(document["config"], changes)
        if args.parallel is not None:
            return train_seeds_parallel(
                config, document["seeds"], run_dir, args.parallel, args.max_epochs_this_run
            )
        return train_seeds(
            config, document["seeds"], run_dir, args.max_epochs_this_run, not args.no_progress
        )
    raise CheckpointError(
        f"{run_dir} is not a run directory (no config.json or seeds.json); "
        "give the directory `delrec train` wrote"
    )


def _with_changes(values: dict, changes: dict) -> TrainConfig:
    values = dict(values)
    values.update({k: v for k, v in changes.items() if v is not None})
    return TrainConfig.from_dict(values)


def _default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.task}-{config.model}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def train_one(
    trainer: Trainer, max_epochs_this_run: int | None = None, resume: bool = False
) -> dict | None:
    """Train (or continue, with ``resume``) the run of ``trainer``; returns its summary (None
    on the ranks of a distributed run other than 0, which stop after training).
    Nothing is written before the trainer exists, i.e. before its data has loaded."""
    config, run_dir, log = trainer.config, trainer.run_dir, trainer.log
    if resume:
        if trainer.restore():
            log(f"resuming {run_dir} after epoch {trainer.state.epoch}/{config.epochs}")
    else:
        log(f"run directory {run_dir}")
    trainer.write_config()
    log(
        f"{config.task} · {config.model} · seed {config.seed} · {config.epochs} epochs · "
        f"batch {config.batch_size} · {len(trainer.data.datasets['train'])} training items · "
        f"device {trainer.device}"
    )
    start = time.perf_counter()
    complete = trainer.fit(max_epochs_this_run)
    if trainer.dist is not None:
        trainer.dist.leave()
    if not trainer.is_main:
        return None
    summary = {
        "status": "complete" if complete else "interrupted",
        "run_dir": str(run_dir),
        "task": config.task,
        "model": config.model,
        "seed": config.seed,
        "epochs_done": trainer.state.epoch,
        "epochs": config.epochs,
        "best_epoch": trainer.state.best_epoch,
        f"valid_{trainer.objective.metric}": trainer.state.best_value,
        "time_s": round(time.perf_counter() - start, 2),
    }
    if not complete:
        log(
            f"stopped after epoch {trainer.state.epoch}/{config.epochs}; continue with "
            f"`delrec train --resume {run_dir}`"
        )
        return summary
    results = trainer.test()
    metric = trainer.objective.metric
    extra = "".join(f"  {k} {results[k]:.4g}" for k in ("nrmse", "r2") if k in results)
    log(
        f"test {metric} {results[metric]:.4g}{extra}  (best-validation epoch "
        f"{results['best_epoch']}, integer delays) → {run_dir}"
    )
    summary["test"] = {k: v for k, v in results.items() if isinstance(v, float)}
    return summary


def train_seeds(
    config: TrainConfig,
    seeds: list[int],
    run_dir: Path,
    max_epochs_this_run: int | None,
    progress: bool,
) -> dict:
    """One run per seed in ``run_dir/seed-<s>`` (resumed where they exist), then mean ± std
    (population std, as the paper's scripts) of every test metric in ``summary.json``."""
    runs = []
    for seed in seeds:
        seed_dir = run_dir / f"seed-{seed}"
        trainer = Trainer(dataclasses.replace(config, seed=seed), seed_dir, progress=progress)
        if not (run_dir / "seeds.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "seeds.json").write_text(
                json.dumps({"seeds": seeds, "config": config.to_dict()}, indent=2) + "\n"
            )
        summary = train_one(
            trainer, max_epochs_this_run, resume=(seed_dir / "config.json").is_file()
        )
        runs.append(summary)
        if summary["status"] != "complete":
            return {"status": "interrupted", "run_dir": str(run_dir), "seeds": seeds, "runs": runs}
    return summarize_seeds(config, seeds, run_dir, runs)


def train_seeds_parallel(
    config: TrainConfig,
    seeds: list[int],
    run_dir: Path,
    workers: int,
    max_epochs_this_run: int | None,
) -> dict:
    """:func:`train_seeds` with ``workers`` seeds at a time, each a ``delrec train`` process
    (one GPU each when there are GPUs). A failing seed does not stop the others; it is reported
    and the summary's status is ``"failed"``."""
    runs, failures = run_seed_processes(config, seeds, run_dir, workers, max_epochs_this_run)
    if failures:
        for seed, reason in sorted(failures.items()):
            print(
                f"delrec train: error: seed {seed} failed ({reason}); its run is "
                f"{run_dir / f'seed-{seed}'}",
                file=sys.stderr,
            )
        print(
            f"delrec train: {len(runs)} of {len(seeds)} seeds ended cleanly; continue with "
            f"`delrec train --resume {run_dir} --parallel {workers}`",
            file=sys.stderr,
        )
        return {
            "status": "failed",
            "run_dir": str(run_dir),
            "seeds": seeds,
            "failed": {str(seed): reason for seed, reason in sorted(failures.items())},
            "runs": runs,
        }
    if any(r["status"] != "complete" for r in runs):
        return {"status": "interrupted", "run_dir": str(run_dir), "seeds": seeds, "runs": runs}
    return summarize_seeds(config, seeds, run_dir, runs)


def summarize_seeds(config: TrainConfig, seeds: list[int], run_dir: Path, runs: list[dict]) -> dict:
    """Mean ± std (population std, as the paper's scripts) of every test metric over the
    complete ``runs`` (in the order of ``seeds``), written to ``summary.json``."""
    metrics = sorted(runs[0]["test"])
    aggregate = {
        k: {
            "mean": statistics.fmean(r["test"][k] for r in runs),
            "std": statistics.pstdev(r["test"][k] for r in runs),
            "values": [r["test"][k] for r in runs],
        }
        for k in metrics
    }
    result = {
        "status": "complete",
        "run_dir": str(run_dir),
        "task": config.task,
        "model": config.model,
        "seeds": seeds,
        "test": aggregate,
        "runs": runs,
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in aggregate.items():
        print(
            f"test {key}: {value['mean']:.4g} ± {value['std']:.2g} over seeds {seeds}",
            file=sys.stderr,
        )
    return result

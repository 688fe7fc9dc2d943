"""Training jobs: a new run, a resumed run, several seeds (one after another or side by side),
each in its run directory and holding that directory's lock while it trains; under
``torchrun`` one run is trained by several processes (docs/distributed.md).

These are what ``delrec train`` and ``delrec sweep`` call. Progress goes to stderr; each job
returns its summary (a JSON-able dict with a ``status``: ``"complete"``, ``"interrupted"``
after ``max_epochs_this_run`` epochs, or ``"failed"`` when seeds run side by side failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from delrec.config import ConfigError, TrainConfig, differences
from delrec.runs import RunDir, RunError
from delrec.training.distributed import (
    DEFAULT_TIMEOUT_S,
    Stopped,
    failure_message,
    is_process_failure,
    process_group,
    resume_command,
    world_size,
)
from delrec.training.loop import Trainer, TrainingError, short_schedule_notes
from delrec.training.parallel_seeds import run_seed_processes


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<task>-<model>-<date>-<time>`` (with a number added if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.task}-{config.model}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def train_run(
    config: TrainConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    max_epochs_this_run: int | None = None,
    dist_backend: str | None = None,
    dist_timeout_s: float = DEFAULT_TIMEOUT_S,
    hint: bool = True,
) -> dict | None:
    """Train one run (a new one in an empty or missing ``run_dir``, chosen by
    :func:`default_run_dir` when ``None``; or, with ``resume``, continue the one there), by
    this process alone or with the others torchrun started. Returns the summary (``None`` on
    the ranks of a distributed run other than 0). ``hint``: a run stopped by
    ``max_epochs_this_run`` names the command that continues it (not in a seed of
    ``--parallel``, whose parent names its own)."""
    with process_group(config.device, dist_backend, dist_timeout_s) as dist:
        if dist is not None:
            _check_same_command(dist, config, max_epochs_this_run)
        if run_dir is None:
            run_dir = default_run_dir(config)
            if dist is not None:
                run_dir = dist.agree(run_dir)
        with _holding(RunDir(run_dir), new=not resume, dist=dist):
            try:
                trainer = Trainer(config, run_dir, progress=progress, dist=dist)
                continue_with = (
                    f"delrec train --resume {run_dir}"
                    if dist is None
                    else resume_command(run_dir, dist.world_size)  # as many processes again
                )
                return train_one(
                    trainer,
                    max_epochs_this_run,
                    resume=resume,
                    continue_with=continue_with if hint else None,
                )
            except (RuntimeError, Stopped) as error:
                if (
                    dist is None
                    or isinstance(error, TrainingError)
                    or not is_process_failure(error)
                ):
                    raise
                raise TrainingError(failure_message(error, run_dir, dist.world_size)) from None


def _check_same_command(dist, config: TrainConfig, max_epochs_this_run: int | None) -> None:
    """A ConfigError on every rank when torchrun's processes were started with different
    settings (a config file or flag that differs between nodes): the ranks would train as one
    network on different recipes, or one would wait for another that stopped earlier. Where a
    process runs (device, data root and cache folder, threads, workers) may differ."""
    settings = dist.gather(launch_settings(config, max_epochs_this_run))
    first, first_limit = settings[0]
    for rank, (values, limit) in enumerate(settings[1:], start=1):
        differ = [differences(first, values, "rank 0", f"rank {rank}")]
        if limit != first_limit:
            differ.append(f"--max-epochs-this-run {first_limit} in rank 0, {limit} in rank {rank}")
        if any(differ):
            raise ConfigError(
                f"torchrun's processes were started with different settings "
                f"({', '.join(filter(None, differ))}): start every process with the same "
                "command and configuration"
            )


def launch_settings(config: TrainConfig, max_epochs_this_run: int | None) -> tuple:
    """What every torchrun process must be started with: the configuration (less the data
    cache folder, a node's local disk, say) and ``max_epochs_this_run``."""
    values = config.to_dict()
    values["data"].pop("cache_dir", None)
    return values, max_epochs_this_run


@contextlib.contextmanager
def _holding(run: RunDir, new: bool, dist):
    """The run directory's lock, held by this process (rank 0 of a distributed run) for the
    block; a new run's directory must be empty. The ranks of a distributed run stop together
    when rank 0 cannot have the directory."""
    if dist is not None and not dist.is_main:
        refusal = dist.agree(None)
        if refusal is not None:
            raise RunError(refusal)
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run.lock())
            if new:
                run.require_new()
        except Exception as error:
            if dist is not None:
                dist.agree(str(error))
            raise
        if dist is not None:
            dist.agree(None)
        yield


def resume(
    run_dir: Path,
    *,
    device: str | None = None,
    data_root: str | None = None,
    parallel: int | None = None,
    progress: bool = True,
    max_epochs_this_run: int | None = None,
    dist_backend: str | None = None,
    dist_timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    num_workers: int | None = None,
    hint: bool = True,
) -> dict | None:
    """Continue the run in ``run_dir`` with its own configuration (a run of several seeds:
    every unfinished seed, ``parallel`` at a time when given); ``device``, ``data_root``,
    ``threads`` and ``num_workers`` may change (``None``: as before); ``hint`` as for
    :func:`train_run`."""
    run = RunDir(run_dir)
    config = run.read_config(
        device=device, data_root=data_root, threads=threads, num_workers=num_workers
    )
    if run.is_single():
        if parallel is not None:
            raise ConfigError(f"{run_dir} is a single run; --parallel resumes a run of --seeds")
        return train_run(
            config,
            run_dir,
            resume=True,
            progress=progress,
            max_epochs_this_run=max_epochs_this_run,
            dist_backend=dist_backend,
            dist_timeout_s=dist_timeout_s,
            hint=hint,
        )
    if world_size() > 1:
        raise ConfigError(
            f"{run_dir} holds several seeds; resume it without torchrun "
            "(--parallel K runs them side by side)"
        )
    seeds = run.read_seeds()["seeds"]
    if parallel is not None:
        return train_seeds_parallel(
            config, seeds, run_dir, parallel, max_epochs_this_run, resume=True
        )
    return train_seeds(config, seeds, run_dir, max_epochs_this_run, progress, resume=True)


def train_one(
    trainer: Trainer,
    max_epochs_this_run: int | None = None,
    resume: bool = False,
    continue_with: str | None = None,
) -> dict | None:
    """Train (or continue, with ``resume``) the run of ``trainer``; returns its summary (None
    on the ranks of a distributed run other than 0, which stop after training).
    ``continue_with``: the command that continues a run stopped by ``max_epochs_this_run``,
    which it then names (``None``: it names none).
    Nothing is written before the trainer exists, i.e. before its data has loaded."""
    config, run_dir, log = trainer.config, trainer.run.path, trainer.log
    if resume:
        if trainer.restore():
            log(f"resuming {run_dir} after epoch {trainer.state.epoch}/{config.epochs}")
    else:
        log(f"run directory {run_dir}")
    limit = config.network.get("max_delay")
    log(
        f"{config.task} · {config.model} · seed {config.seed} · {config.epochs} epochs · "
        f"batch {config.batch_size} · {len(trainer.data.datasets['train'])} training items · "
        f"device {trainer.device}"
        + ("" if limit is None else f" · delays ≤ {limit} steps (network.max_delay)")
    )
    for note in short_schedule_notes(config, trainer.optimizers):
        log(note)
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
        then = f"; continue with `{continue_with}`" if continue_with else ""
        log(f"stopped after epoch {trainer.state.epoch}/{config.epochs}{then}")
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
    max_epochs_this_run: int | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """One run per seed in ``run_dir/seed-<s>`` (resumed where they exist), then mean ± std
    (population std, as the paper's scripts) of every test metric in ``summary.json``. A new
    run (not ``resume``) needs an empty or missing ``run_dir``."""
    run = RunDir(run_dir)
    with run.lock():
        if not resume:
            run.require_new()
        runs, budget = [], max_epochs_this_run  # epochs of this invocation, all seeds together
        for seed in seeds:
            seed_run = run.seed(seed)
            if budget == 0 and not seed_run.has_checkpoint("last"):
                print(
                    f"stopped before seed {seed}; continue with `delrec train --resume {run_dir}`",
                    file=sys.stderr,
                )
                return _interrupted(run_dir, seeds, runs)
            with seed_run.lock():
                trainer = Trainer(
                    dataclasses.replace(config, seed=seed), seed_run.path, progress=progress
                )
                if not run.is_multi_seed():  # once the first seed's data has loaded
                    run.write_seeds(seeds, config)
                before = len(seed_run.read_metrics())  # epochs it trained in earlier invocations
                summary = train_one(
                    trainer,
                    budget,
                    resume=seed_run.is_single(),
                    continue_with=f"delrec train --resume {run_dir}",
                )
            runs.append(summary)
            if budget is not None:
                budget -= summary["epochs_done"] - before
            if summary["status"] != "complete":
                return _interrupted(run_dir, seeds, runs)
        return summarize_seeds(config, seeds, run, runs)


def _interrupted(run_dir: Path, seeds: list[int], runs: list[dict]) -> dict:
    return {"status": "interrupted", "run_dir": str(run_dir), "seeds": seeds, "runs": runs}


def train_seeds_parallel(
    config: TrainConfig,
    seeds: list[int],
    run_dir: Path,
    workers: int,
    max_epochs_this_run: int | None = None,
    resume: bool = False,
) -> dict:
    """:func:`train_seeds` with ``workers`` seeds at a time, each a ``delrec train`` process
    (one GPU each when there are GPUs). A failing seed does not stop the others; it is reported
    and the summary's status is ``"failed"``."""
    run = RunDir(run_dir)
    with run.lock():
        if not resume:
            run.require_new()
        runs, failures = run_seed_processes(config, seeds, run, workers, max_epochs_this_run)
        if failures:
            for seed, reason in sorted(failures.items()):
                print(
                    f"delrec train: error: seed {seed} failed ({reason}); its run is "
                    f"{run.seed(seed).path}",
                    file=sys.stderr,
                )
            then = (
                f"continue with `delrec train --resume {run_dir} --parallel {workers}`"
                if run.is_multi_seed()
                else "run the same command again (no seed started)"
            )
            print(
                f"delrec train: {len(runs)} of {len(seeds)} seeds ended cleanly; once what "
                f"the errors above name is dealt with, {then}",
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
            complete = sum(r["status"] == "complete" for r in runs)
            print(
                f"delrec train: stopped with {complete} of {len(seeds)} seeds complete; "
                f"continue with `delrec train --resume {run_dir} --parallel {workers}`",
                file=sys.stderr,
            )
            return _interrupted(run_dir, seeds, runs)
        return summarize_seeds(config, seeds, run, runs)


def summarize_seeds(config: TrainConfig, seeds: list[int], run: RunDir, runs: list[dict]) -> dict:
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
        "run_dir": str(run.path),
        "task": config.task,
        "model": config.model,
        "seeds": seeds,
        "test": aggregate,
        "runs": runs,
    }
    run.write_summary(result)
    for key, value in aggregate.items():
        print(
            f"test {key}: {value['mean']:.4g} ± {value['std']:.2g} over seeds {seeds}",
            file=sys.stderr,
        )
    return result

"""``delrec train --seeds … --parallel K``: independent seeds as K concurrent ``delrec train``
processes on one machine, one GPU each when there are GPUs.

Each seed runs in ``RUN_DIR/seed-<s>`` exactly as ``--seeds`` runs it one after another (a
fresh run from the resolved configuration, or ``--resume`` where the seed's run exists), so
its results, and the mean ± std over the seeds, are the same (same device and thread count).
A child's stderr is forwarded line by line with a ``[seed s]`` prefix; its stdout is the
usual JSON summary line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import torch

from delrec.config import ConfigError, TrainConfig
from delrec.runs import RunDir

POLL_S = 0.1
PARENT_VARIABLE = "DELREC_PARENT_PID"  # in a seed's environment: the process id of its parent
_print_lock = threading.Lock()


def end_with_parent() -> bool:
    """In a seed's ``delrec train`` (``DELREC_PARENT_PID`` set): a SIGTERM to this process once
    that parent is gone, killed even by SIGKILL. The seeds run in sessions of their own (so that
    a terminal's Ctrl-C reaches only the parent, which stops them) and would otherwise train on
    unseen, holding their runs' locks. Returns whether this process is such a seed."""
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if not parent.isdigit():
        return False

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="delrec-parent-watch", daemon=True).start()
    return True


def gpu_ids(config: TrainConfig) -> list[str]:
    """The GPUs to hand out, one per concurrent seed (``[]``: the seeds run on the CPU)."""
    if config.device == "cpu" or not torch.cuda.is_available():
        return []
    if config.device not in ("auto", "cuda"):
        raise ConfigError(
            f"--parallel gives every seed its own GPU; use --device auto or cuda, "
            f"not {config.device!r}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def seed_command(
    config: TrainConfig,
    config_file: Path,
    seed: int,
    seed_run: RunDir,
    max_epochs_this_run: int | None,
) -> list[str]:
    """The ``delrec train`` command line of one seed: a resume where its run exists."""
    command = [sys.executable, "-m", "delrec", "train", "--no-progress"]
    if seed_run.is_single():
        command += ["--resume", str(seed_run.path), "--device", config.device]
        if config.data_root is not None:
            command += ["--data-root", config.data_root]
        command += ["--set", f"threads={json.dumps(config.threads)}"]
        command += [f"num_workers={config.num_workers}"]
    else:
        command += [
            "--config",
            str(config_file),
            "--seed",
            str(seed),
            "--run-dir",
            str(seed_run.path),
        ]
    if max_epochs_this_run is not None:
        command += ["--max-epochs-this-run", str(max_epochs_this_run)]
    return command


class SeedProcess:
    """One seed's ``delrec train`` child: stderr forwarded with a prefix (its last lines kept
    for the error report), stdout collected."""

    def __init__(self, seed: int, command: list[str], gpu: str | None):
        self.seed = seed
        env = {**os.environ, PARENT_VARIABLE: str(os.getpid())}  # it ends when this process does
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.tail: deque[str] = deque(maxlen=50)
        self.stdout: list[str] = []
        self.readers = [
            threading.Thread(target=self._forward_stderr, daemon=True),
            threading.Thread(target=self._collect_stdout, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _forward_stderr(self) -> None:
        for line in self.process.stderr:
            self.tail.append(line.rstrip("\n"))
            with _print_lock:
                print(f"[seed {self.seed}] {line}", end="", file=sys.stderr, flush=True)

    def _collect_stdout(self) -> None:
        self.stdout = self.process.stdout.read().splitlines()

    def result(self) -> tuple[dict | None, str | None]:
        """``(summary, None)`` after a clean exit, else ``(None, why it failed)``."""
        for reader in self.readers:
            reader.join()
        code = self.process.wait()
        if code == 0 and self.stdout:
            return json.loads(self.stdout[-1]), None
        if code < 0:  # a signal: its last output line says nothing of why
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return None, f"killed by {name}"
        lines = [line.strip() for line in self.tail if line.strip()] or ["no output"]
        errors = [i for i, line in enumerate(lines) if line.startswith("delrec train: error:")]
        message = " ".join(lines[errors[-1] if errors else -1 :])
        return None, f"exit code {code}: {message.removeprefix('delrec train: error: ')}"

    def stop(self) -> None:
        """End the child and everything it started (its own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def run_seed_processes(
    config: TrainConfig,
    seeds: list[int],
    run: RunDir,
    workers: int,
    max_epochs_this_run: int | None,
) -> tuple[list[dict], dict[int, str]]:
    """Run every seed, at most ``workers`` at a time; returns the summaries of the seeds that
    ended cleanly (in the order of ``seeds``) and the failures by seed. ``seeds.json`` is
    written before the first seed starts: a seed's ``config.json`` never exists without it, so
    ``--resume`` continues the run whenever this process is killed; it is removed again when no
    seed started (their data failed to load), so that the same command starts the run again."""
    gpus = gpu_ids(config)
    pending, running = list(seeds), {}
    summaries, failures = {}, {}
    with tempfile.TemporaryDirectory(prefix="delrec-seeds-") as folder:
        config_file = Path(folder) / "config.json"
        config_file.write_text(json.dumps(config.to_dict()), encoding="utf-8")
        ours = not run.is_multi_seed()
        if ours:
            run.write_seeds(seeds, config)
        try:
            while pending or running:
                for slot in range(workers):
                    if slot not in running and pending:
                        seed = pending.pop(0)
                        command = seed_command(
                            config, config_file, seed, run.seed(seed), max_epochs_this_run
                        )
                        running[slot] = SeedProcess(
                            seed, command, gpus[slot % len(gpus)] if gpus else None
                        )
                for slot, job in list(running.items()):
                    if job.process.poll() is not None:
                        summary, failure = job.result()
                        if failure is None:
                            summaries[job.seed] = summary
                        else:
                            failures[job.seed] = failure
                        del running[slot]
                time.sleep(POLL_S if running else 0)
        finally:
            for job in running.values():
                job.stop()
            if ours and not any(run.seed(s).is_single() for s in seeds):
                run.forget_seeds()
    return [summaries[s] for s in seeds if s in summaries], failures

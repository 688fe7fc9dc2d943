"""`delrec eval RUN_DIR`: re-evaluate a run's checkpoint on a split, with integer delays (as a
chip runs them) by default or with the σ-spread kernel of its last training epoch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from delrec.checkpoint import CheckpointError, load_checkpoint, load_network
from delrec.config import ConfigError, TrainConfig
from delrec.data import SPLITS, DataError
from delrec.layers import DelRec
from delrec.training.loop import eval_loader, evaluate, load_splits, resolve_device
from delrec.training.objectives import make_objective


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="re-evaluate a trained run (integer delays by default)",
        description="Evaluate the best (or last) checkpoint of a run directory on a split.",
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a directory written by `delrec train` (or a .pt checkpoint)",
    )
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="use the real-valued delays and σ-spread kernel of training instead of integer delays",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--data-root", help="folder of the data set's files, if it moved")
    parser.set_defaults(run=run)


def evaluate_run(
    run_dir: Path,
    checkpoint: str = "best",
    split: str = "test",
    spread: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    data_root: str | None = None,
) -> dict:
    """Metrics of a run's checkpoint on ``split``; see the module docstring."""
    payload = load_checkpoint(run_dir, checkpoint)
    if "train_config" not in payload:
        raise CheckpointError(
            f"{run_dir} holds a network but no training configuration; "
            "evaluate checkpoints written by `delrec train`"
        )
    values = dict(payload["train_config"])
    values.update(device=device, **({"data_root": data_root} if data_root else {}))
    config = TrainConfig.from_dict(values)
    target = resolve_device(config.device)
    network = load_network(run_dir, checkpoint).to(target)
    layers = [m for m in network.modules() if isinstance(m, DelRec)]
    for layer in layers:
        layer.integer_eval = not spread
    data = load_splits(config, splits=(split,), stored=payload)
    objective = make_objective(data.info.task, network.config.readout, data.standardization)
    loader = eval_loader(data.datasets[split], batch_size or config.eval_batch_size)
    metrics, _ = evaluate(network, loader, objective, target)
    sigma = max((float(m.sigma) for m in layers if m.learn_delays), default=0.0)
    return {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "epoch": payload["epoch"],
        "split": split,
        "delays": f"spread (σ = {sigma:.4g})" if spread else "integer",
        "items": len(data.datasets[split]),
        **metrics,
    }


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        print("delrec eval: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(
            args.run_dir,
            args.checkpoint,
            args.split,
            args.spread,
            args.device,
            args.batch_size,
            args.data_root,
        )
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"delrec eval: error: {error}", file=sys.stderr)
        return 2
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
    print(
        f"{result['split']} ({result['checkpoint']} checkpoint, epoch {result['epoch']}, "
        f"{result['delays']} delays): {shown}",
        file=sys.stderr,
    )
    print(json.dumps(result), flush=True)
    return 0

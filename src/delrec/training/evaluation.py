"""Evaluation: a network's metrics over a loader, and a run's checkpoint re-evaluated on a split
with integer delays (as a chip runs them) or with the σ-spread kernel of training."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from delrec.checkpoint import CheckpointError, unusable
from delrec.config import resolve_device
from delrec.layers import DelRec, delay_parameters, rounding_layers
from delrec.models import SpikingNetwork
from delrec.runs import (
    checkpoint_config,
    checkpoint_file,
    eval_loader,
    load_splits,
    load_trained,
)
from delrec.training.objectives import make_objective


@torch.no_grad()
def evaluate(
    network: SpikingNetwork,
    loader,
    objective,
    device: torch.device,
    keep_outputs: bool = False,
    dist=None,
) -> tuple[dict[str, float], Tensor | None]:
    """Metrics of ``network`` in eval mode (integer delays unless a layer's ``integer_eval``
    is off) over ``loader``; with ``keep_outputs``, the predictions / class scores in item
    order, on the CPU. ``dist``: a DataParallel whose sharded ``loader`` this rank reads;
    the metrics are those of the whole split. The network is left in the mode it was in."""
    was_training = network.training
    network.eval()
    meter, outputs = objective.meter(), []
    try:
        for step, (frames, lengths, targets) in enumerate(loader):
            frames, targets = frames.to(device), targets.to(device)
            if dist is not None:
                frames, share = dist.begin_step(loader, step, frames)
                if share == 0:
                    continue
            loss, output = objective(network(frames), lengths, targets)
            meter.update(loss, output, targets)
            if keep_outputs:
                outputs.append(output.cpu())
    finally:  # a training loop that validates mid-epoch goes on training (delays included)
        network.train(was_training)
    if dist is not None:
        dist.reduce_meter(meter)
    return meter.result(), torch.cat(outputs) if keep_outputs else None


def evaluate_run(
    run_dir: str | os.PathLike,
    checkpoint: str = "best",
    split: str = "test",
    spread: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    data_root: str | None = None,
) -> dict:
    """Metrics of a run's ``checkpoint`` (``"best"`` or ``"last"``; or a checkpoint file
    written by training) on ``split``, with integer delays or, with ``spread``, the
    real-valued delays and the σ saved with that checkpoint (the σ of its epoch); a model that
    learns no delays (snn, rsnn, fixed) has integer ones either way (``"delays": "integer"``).
    ``data_root``: where the data set's files are now, if they moved."""
    file = checkpoint_file(run_dir, checkpoint)
    payload, network = load_trained(file)
    config = checkpoint_config(payload, run_dir, device=device, data_root=data_root or None)
    target = resolve_device(config.device)
    network = network.to(target)
    spread = spread and bool(delay_parameters(network))  # else the delays are integers anyway
    for layer in rounding_layers(network):
        layer.integer_eval = not spread
    layers = [m for m in network.modules() if isinstance(m, DelRec)]
    data = load_splits(config, splits=(split,), stored=payload)
    objective = make_objective(data.info.task, network.config.readout, data.standardization)
    loader = eval_loader(data.datasets[split], batch_size or config.eval_batch_size)
    try:
        metrics, _ = evaluate(network, loader, objective, target)
    except ValueError as error:  # a value the layers refuse: delays beyond max_delay, overflow
        raise CheckpointError(
            f"the network in {file} cannot be evaluated ({unusable(error)}): if the file was "
            "edited or damaged, use the run's other checkpoint or retrain"
        ) from None
    sigma = max((float(m.sigma) for m in layers if m.learn_delays), default=0.0)
    return {
        "run_dir": str(run_dir),
        "model": config.model,
        "checkpoint": payload.get("kind", checkpoint),  # a .pt file names its own kind
        "epoch": payload["epoch"],
        "split": split,
        "delays": f"spread (σ = {sigma:.4g})" if spread else "integer",
        "items": len(data.datasets[split]),
        **metrics,
    }

"""Checkpoints: atomic writes, and the network stored in a checkpoint or run directory.

A checkpoint is a ``torch.save``'d dict readable with ``weights_only=True``:
``{"format": FORMAT, "network_config": dict, "model": state_dict, ...}``; training adds its
own entries (optimizers, schedulers, RNG states, epoch). A run directory keeps its
checkpoints as ``RUN_DIR/checkpoints/{best,last}.pt``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from delrec.files import write_atomic
from delrec.models import NetworkConfig, SpikingNetwork, build_network

FORMAT = "delrec-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint or run directory that cannot be read; the message says why and what to do."""


def atomic_save(payload: dict, path: str | os.PathLike) -> None:
    """``torch.save`` whole or not at all (:func:`delrec.files.write_atomic`)."""

    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a file object: the archive's inner name is fixed
            torch.save(payload, handle)

    write_atomic(path, save)


def network_payload(network: SpikingNetwork) -> dict:
    """The part of a checkpoint that rebuilds ``network``."""
    return {
        "format": FORMAT,
        "network_config": dataclasses.asdict(network.config),
        "model": network.state_dict(),
    }


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint file from a file path or a run directory (``checkpoints/{which}.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: give a run directory written by "
            "`delrec train` or a .pt checkpoint file"
        )
    return path


def load_checkpoint(path: str | os.PathLike, which: str = "best") -> dict:
    """Read a checkpoint (file or run directory) and check its format."""
    path = resolve_checkpoint(path, which)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a delrec checkpoint "
            f"({error}); use the run's other checkpoint or retrain"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    return payload


def load_network(path: str | os.PathLike, which: str = "best") -> SpikingNetwork:
    """The trained network of a checkpoint file or run directory, in eval mode."""
    payload = load_checkpoint(path, which)
    network = build_network(NetworkConfig(**payload["network_config"]))
    network.load_state_dict(payload["model"])
    return network.eval()

"""Checkpoint files: what a checkpoint holds, and writing and reading one.

A checkpoint is a ``torch.save``'d dict readable with ``weights_only=True``:
``{"format": FORMAT, "network_config": dict, "model": state_dict, ...}``; training adds its
own entries (optimizers, schedulers, RNG states, epoch). Where a run keeps its checkpoints is
the run directory's concern (:mod:`delrec.runs`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from delrec.delays import DelayLimitWarning, check_delays, check_sigma
from delrec.files import write_atomic
from delrec.models import NetworkConfig, SpikingNetwork, build_network

FORMAT = "delrec-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message says why and what to do."""


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` whole or not at all (:func:`delrec.files.write_atomic`)."""

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


def _head(path: Path, size: int) -> bytes | None:
    """The first ``size`` bytes of the file ``path``; None where it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return None


def _starts_like_torch_save(path: Path) -> bool:
    """Whether ``path`` begins as a file of torch.save does: a zip archive, or the pickle of
    the legacy format (protocol 2 or later)."""
    head = _head(path, 4)
    return head is None or head.startswith((b"PK\x03\x04", b"\x80"))  # None: torch says more


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of an HDF5 file (a NIR export)


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file (a NIR export), by its first bytes."""
    return _head(Path(path), len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def _is_json(path: Path) -> bool:
    """Whether ``path`` starts like a JSON object (a run's own files), whitespace aside."""
    return (_head(path, 64) or b"").lstrip().startswith(b"{")


REREAD = "use the run's other checkpoint or retrain"  # what to do with a damaged checkpoint


def read_checkpoint(path: str | os.PathLike, fix: str = REREAD) -> dict:
    """Read the checkpoint file ``path`` and check its format and that its network is finite
    (no NaN or infinite parameter or buffer); ``fix`` ends the message of a damaged file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = str(error).strip().splitlines() or [""]
        if is_hdf5(path):
            raise CheckpointError(
                f"{path} is an HDF5 file, such as a NIR export, not a checkpoint: give the run "
                "directory or one of its checkpoints/*.pt (delrec.deploy.import_nir reads a NIR "
                "file)"
            ) from None
        if _is_json(path):
            raise CheckpointError(
                f"{path} is a JSON text file, such as a run's config.json, not a checkpoint: "
                "give the run directory or one of its checkpoints/*.pt"
            ) from None
        if not _starts_like_torch_save(path):
            reason = "it is not a file torch.save writes: no zip archive, no pickle"
        elif lines[0].startswith("Weights only load failed"):
            # torch's advice to unpickle anything would be wrong here
            reason = "torch.load reads no checkpoint of tensors and plain values in it"
        else:
            first = lines[0].split(". ")[0]  # torch's explanation after it is generic
            reason = f"{type(error).__name__}: {first}".rstrip(": ")
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a delrec checkpoint ({reason}); {fix}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    model = payload.get("model")
    bad = [
        name
        for name, value in (model.items() if isinstance(model, dict) else ())
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {', '.join(bad)}: the run that wrote it "
            "diverged; use the run's other checkpoint or retrain with a lower learning rate"
        )
    return payload


def unusable(error: Exception) -> str:
    """What a checkpoint's payload lacked or held wrong, in one line of at most 300 characters
    (a KeyError names the missing entry; load_state_dict's first misshapen tensors)."""
    problem = f"no {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
    return problem if len(problem) <= 300 else problem[:297] + "..."


def network_from(payload: dict, source: str | os.PathLike = "the checkpoint") -> SpikingNetwork:
    """The network a checkpoint's payload holds, in eval mode; a CheckpointError naming
    ``source`` (the file) when its configuration or weights do not rebuild one."""
    try:
        with warnings.catch_warnings():  # the checkpoint's delays replace the initial draw
            warnings.simplefilter("ignore", DelayLimitWarning)
            network = build_network(NetworkConfig(**payload["network_config"]))
        network.load_state_dict(payload["model"])
        for name, value in network.state_dict().items():
            if name.endswith((".delay", ".position")):
                check_delays(value, name)
            elif name.endswith(".sigma"):
                check_sigma(value, name)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"the network in {source} cannot be rebuilt ({unusable(error)}): the file was "
            "edited or written by another version of delrec; use the run's other checkpoint or "
            "retrain"
        ) from None
    return network.eval()

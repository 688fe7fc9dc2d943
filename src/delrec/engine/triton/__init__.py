"""GPU kernels of the engine, written in Triton (an optional dependency).

Every time loop of the engine has a Triton version here: the axonal/shared recurrence forward
and backward (:mod:`.axonal`), synaptic delays (:mod:`.synaptic`), integer-delay inference
(:mod:`.ring`), and the network around the delays (:mod:`.fused`: feedforward LIF layers with
their dropout, the leaky-integrator readout, dropout, BatchNorm; the CUDA kernels of
:mod:`delrec.engine.fused`). They compute what the C++ loops compute, on the same algorithms
(docs/gpu.md says how they are laid out on the GPU).

They run compiled on CUDA tensors. With ``TRITON_INTERPRET=1`` set when the kernel modules
are imported, Triton's interpreter runs the same kernels on CPU tensors (slowly): that is how
the tests check them on machines without a GPU.

This package imports without Triton and imports the kernel modules only when a path runs
(:func:`axonal_recurrence`, :func:`synaptic_recurrence`, :func:`ring_recurrence`, the engine
paths ``triton-axonal``, ``triton-synaptic``, ``triton-ring``; the fused network's
``KERNELS["cuda"]``); :func:`available` says whether the kernels run on a device and
:func:`missing_reason` why not.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from delrec import user_warnings


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    """Whether the kernels run under the interpreter: fixed when they are first imported
    (:mod:`delrec.engine.triton.lif` reads ``TRITON_INTERPRET`` then), so the variable set
    later does not count."""
    lif = sys.modules.get("delrec.engine.triton.lif")
    return lif.INTERPRETED if lif is not None else interpreting()


def _check_device(current: torch.Tensor) -> None:
    """A RuntimeError, not Triton's own ("0 active drivers"), for a path called by name on
    tensors its kernels cannot run on."""
    if current.device.type != "cuda" and not kernels_interpreted():
        raise RuntimeError(
            f"the Triton paths run on CUDA tensors, or on CPU tensors under Triton's "
            f"interpreter (TRITON_INTERPRET=1 set before the kernels are first imported), not "
            f"on these {current.device.type} tensors; use engine='auto' for a path that runs "
            "on them"
        )


@functools.cache
def installed() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """True when the kernels run compiled on tensors of ``device``: CUDA, with ``triton``.
    (Under the interpreter they run on CPU tensors too, but only when called by name: the
    engine never picks them there.)"""
    device = torch.device(device)
    return (
        device.type == "cuda" and installed() and not interpreting() and torch.cuda.is_available()
    )


def missing_reason(device: torch.device | str) -> str | None:
    """Why the kernels don't run compiled on ``device`` (None when they do)."""
    device = torch.device(device)
    if not installed():
        return (
            "the Triton kernels need the 'triton' package: pip install triton==3.7.1 (the "
            "version torch 2.13.0 needs; another makes pip replace torch), as make setup does"
        )
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA tensors, not {device.type}"
    if interpreting():
        return "TRITON_INTERPRET=1 makes Triton interpret its kernels on CPU tensors"
    return None if torch.cuda.is_available() else "CUDA is not available here"


@functools.cache
def _warn_missing(reason: str) -> None:
    user_warnings.warn(
        f"{reason}: CUDA layers run the PyTorch-op loops instead (about twenty small kernels "
        "per time step)",
        RuntimeWarning,
    )


_interpreter_paths = False


def offer_interpreted_paths() -> None:
    """Let the engine select the Triton paths for CPU tensors under the interpreter
    (``TRITON_INTERPRET=1``), and the fused network the Triton kernels where the C++ ones are
    not built: what a dry run of the GPU benchmark does to run them end to end without a GPU.
    Otherwise they run on the CPU only when called by name (the tests)."""
    global _interpreter_paths
    _interpreter_paths = True


def runs_on(device: torch.device) -> bool:
    """Whether the Triton engine paths run on ``device`` (their ``runs_on``): compiled on CUDA;
    on the CPU only after :func:`offer_interpreted_paths`. On CUDA without ``triton``, one
    warning says why the slower paths run."""
    device = torch.device(device)
    if device.type == "cpu":
        return _interpreter_paths and installed() and kernels_interpreted()
    if available(device):
        return True
    if device.type == "cuda" and not installed():
        _warn_missing(missing_reason(device))
    return False


def axonal_recurrence(current, weight, delay, width, neuron, mask=None, state=None):
    """Path ``triton-axonal``: :func:`delrec.engine.triton.axonal.recurrence`."""
    _check_device(current)
    from delrec.engine.triton import axonal

    return axonal.recurrence(current, weight, delay, width, neuron, mask, state)


def synaptic_recurrence(current, weight, delay, width, neuron, mask=None):
    """Path ``triton-synaptic``: :func:`delrec.engine.triton.synaptic.recurrence`."""
    _check_device(current)
    from delrec.engine.triton import synaptic

    return synaptic.recurrence(current, weight, delay, width, neuron, mask)


def ring_recurrence(current, weight, delay, width, neuron, mask=None):
    """Path ``triton-ring``: :func:`delrec.engine.triton.ring.recurrence`."""
    _check_device(current)
    from delrec.engine.triton import ring

    return ring.recurrence(current, weight, delay, width, neuron, mask)

"""Execution engines of the recurrent-delay layer, and the one place that chooses between them.

An engine *path* runs the whole recurrence of a layer over a sequence::

    path.run(current (T, B, N), weight (N, N), delay (N,) or (N, N), width float or (N,),
             neuron, mask (B, N) or None) -> spikes (T, B, N)

(row of ``weight`` = postsynaptic neuron; delays and half-width in steps, one width per
presynaptic neuron; ``mask``: recurrent dropout fixed over time). A ``stateful`` path also runs
one chunk of a longer sequence, ``path.run(..., mask, state=RecurrentState) -> (spikes, final
state)`` (:mod:`delrec.engine.state`). An empty batch (``B = 0``) never reaches a path's
function: :class:`EnginePath` answers it with an empty spike tensor connected to every input,
whose gradients are zeros of their shapes (and the state it was given). :data:`PATHS` holds every
path by name, in order of preference; :func:`select` returns the one that runs a layer's
configuration here, and the layer runs it. Nothing falls back at run time.

===================  ==============================================================================
``triton-ring``      integer-delay inference, built-in LIF, Triton kernels (CUDA)
``cpp-ring``         integer-delay inference (eval mode, no autograd), built-in LIF, C++ (CPU)
``ring``             the same in PyTorch ops (any device)
``cpp-axonal``       axonal/shared delays, built-in LIF, C++ time loops (CPU)
``cpp-synaptic``     synaptic delays, built-in LIF, C++ slot traces (CPU)
``triton-axonal``    axonal/shared delays, built-in LIF, Triton kernels (CUDA)
``triton-synaptic``  synaptic delays, built-in LIF, lag-stacked Triton kernels (CUDA)
``torch-axonal``     axonal/shared delays, built-in LIF, PyTorch ops (any device)
``torch-synaptic``   synaptic delays, built-in LIF, lag-stacked GEMM in PyTorch ops (any device)
``reference``        every delay type and neuron, autograd of the buffer loop (any device)
===================  ==============================================================================

To add a path, write its ``run`` function with the signature above and call
:func:`register` (before the paths it should be preferred to). To force one in a test or a
benchmark, run ``PATHS[name].run(...)`` after checking ``supports``/``available``, or build the
layer with ``DelRec(..., engine=name)``.

``torch.compile``: the layers' forwards (``DelRec``, ``FeedforwardDelay``), the fused loops of
:mod:`delrec.engine.fused` and the preset networks' ``SpikingNetwork`` forwards are marked
``torch.compiler.disable``, so a compiled model runs them as they are, a graph break at each,
and compiles the rest of a model of one's own. Their paths are compiled loops already, which
the compiler cannot see into (it used to try, warning at every kernel call).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from delrec.engine import axonal, native, ring, synaptic
from delrec.engine import triton as gpu
from delrec.engine.lif import is_builtin_lif
from delrec.engine.reference import reference_recurrence, triangle_recurrence
from delrec.engine.state import RecurrentState, empty_batch_safe

DELAY_TYPES = ("axonal", "synaptic", "shared")
MODES = ("auto", "fast")  # a layer's engine option: one of these or a path name


def _anywhere(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class EnginePath:
    """One way to run the recurrence (module docstring).

    ``delay_types``: the delay types it runs; ``lif_only``: only the built-in
    :class:`~delrec.neurons.LIF`; ``grad``: differentiable; ``integer_only``: only integer-delay
    inference without autograd; ``stateful``: ``run`` takes ``state=`` (a chunk of a sequence,
    :mod:`delrec.engine.state`); ``loop_dropout``: from rest, ``run`` takes
    ``output_dropout=`` (a :class:`~delrec.engine.dropout.MaskDraw`) and returns the spikes
    dropped in its forward loop, its backward loop applying the mask to their gradient, and,
    with a neuron whose drive is the current (``LIFMap.drives_directly``), ``input_dropout=``,
    dropping the input current in its forward loop and its gradient in the backward;
    ``runs_on(device)``: whether it can run on that device here (the C++ kernels built, a GPU
    library importable); it warns once itself when it should (``delrec.engine.native.load``
    does for the C++ kernels). ``float_types``: the dtypes its kernels take (compiled paths:
    float32 and float64), or None for any of PyTorch's. ``max_reach``: its kernels take only
    delays and half-widths with ``max|1 + d| + max w`` (:func:`kernel_reach`) below this many
    steps (``cpp-synaptic``'s plan: :data:`delrec.engine.synaptic.CPP_REACH`, under
    ``MAX_DELAY``). ``run`` is kept wrapped so that an empty batch never reaches it (module
    docstring).
    """

    name: str
    run: Callable[..., Tensor]
    delay_types: tuple[str, ...] = DELAY_TYPES
    lif_only: bool = True
    grad: bool = True
    integer_only: bool = False
    stateful: bool = False
    loop_dropout: bool = False
    runs_on: Callable[[torch.device], bool] = _anywhere
    float_types: tuple[torch.dtype, ...] | None = None
    max_reach: float = math.inf

    def __post_init__(self):
        if not getattr(self.run, "empty_batch_safe", False):
            object.__setattr__(self, "run", empty_batch_safe(self.run))

    def supports(
        self, delay_type: str, neuron: nn.Module, integer: bool, grad: bool, state: bool = False
    ) -> bool:
        """True if this path computes the configuration: its delay type, neuron, whether the
        delays are integers with σ = 0 (eval mode), whether autograd is needed and whether it
        runs from a state (a chunk of a sequence)."""
        return (
            delay_type in self.delay_types
            and (is_builtin_lif(neuron) or not self.lif_only)
            and (self.grad or not grad)
            and (integer and not grad or not self.integer_only)
            and (self.stateful or not state)
        )

    def available(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
        """True if this path can run ``dtype`` tensors on ``device`` here."""
        fits = self.float_types is None or dtype in self.float_types
        return fits and self.runs_on(torch.device(device))


FLOATS = (torch.float32, torch.float64)  # the dtypes of the compiled kernels


def _cpu_kernels(name: str) -> Callable[[torch.device], bool]:
    def runs_on(device: torch.device) -> bool:
        return device.type == "cpu" and native.load(name) is not None

    return runs_on


PATHS: dict[str, EnginePath] = {
    path.name: path
    for path in (
        EnginePath(
            "triton-ring",
            gpu.ring_recurrence,
            grad=False,
            integer_only=True,
            runs_on=gpu.runs_on,
            float_types=FLOATS,
        ),
        EnginePath(
            "cpp-ring",
            ring.cpp_ring_recurrence,
            grad=False,
            integer_only=True,
            stateful=True,
            runs_on=_cpu_kernels("ring"),
            float_types=FLOATS,
        ),
        EnginePath("ring", ring.ring_recurrence, grad=False, integer_only=True, stateful=True),
        EnginePath(
            "cpp-axonal",
            axonal.cpp_recurrence,
            ("axonal", "shared"),
            stateful=True,
            loop_dropout=True,
            runs_on=_cpu_kernels("axonal"),
            float_types=FLOATS,
        ),
        EnginePath(
            "cpp-synaptic",
            synaptic.cpp_recurrence,
            ("synaptic",),
            stateful=True,
            runs_on=_cpu_kernels("synaptic"),
            float_types=FLOATS,
            max_reach=synaptic.CPP_REACH,
        ),
        EnginePath(
            "triton-axonal",
            gpu.axonal_recurrence,
            ("axonal", "shared"),
            stateful=True,
            runs_on=gpu.runs_on,
            float_types=FLOATS,
        ),
        EnginePath(
            "triton-synaptic",
            gpu.synaptic_recurrence,
            ("synaptic",),
            runs_on=gpu.runs_on,
            float_types=FLOATS,
        ),
        EnginePath("torch-axonal", axonal.torch_recurrence, ("axonal", "shared"), stateful=True),
        EnginePath("torch-synaptic", synaptic.torch_recurrence, ("synaptic",), stateful=True),
        EnginePath("reference", triangle_recurrence, lif_only=False, stateful=True),
    )
}


def register(path: EnginePath, before: str | None = None) -> None:
    """Add ``path`` to :data:`PATHS`, preferred to the path named ``before`` and those after it
    (default: last, after ``reference``)."""
    if path.name in PATHS or path.name in MODES:
        raise ValueError(f"an engine path named {path.name!r} exists already")
    names = list(PATHS)
    if before is not None and before not in PATHS:
        raise ValueError(f"no engine path named {before!r} to insert before; paths: {names}")
    entries = list(PATHS.items())
    entries.insert(len(names) if before is None else names.index(before), (path.name, path))
    PATHS.clear()
    PATHS.update(entries)


def check_engine(engine: str, neuron: nn.Module) -> None:
    """Raises if ``engine`` is neither a mode (``"auto"``, ``"fast"``) nor a path name, or if it
    is ``"fast"`` and ``neuron`` is not the built-in LIF."""
    if engine not in MODES and engine not in PATHS:
        raise ValueError(f"engine must be one of {(*MODES, *PATHS)}, got {engine!r}")
    if engine == "fast" and not is_builtin_lif(neuron):
        raise ValueError(
            f"engine='fast' runs only the built-in LIF neuron, not {type(neuron).__name__}; "
            "use engine='auto' or 'reference'"
        )


def kernel_reach(delay: Tensor, width: Tensor | float) -> float:
    """``max|1 + d| + max w`` in steps: how far the kernels of ``delay`` (``(N,)`` or
    ``(N, N)``) and half-width ``width`` (a number or ``(N,)``) reach (two device syncs)."""
    longest = float((1.0 + delay.detach()).abs().max())
    return longest + float(torch.as_tensor(width).detach().max())


def select(
    delay_type: str,
    neuron: nn.Module,
    *,
    device: torch.device | str,
    integer: bool,
    grad: bool,
    engine: str = "auto",
    state: bool = False,
    dtype: torch.dtype = torch.float32,
    reach: Callable[[], float] | None = None,
) -> EnginePath:
    """The one path that runs this configuration on ``device``.

    ``delay_type``: ``"axonal"``, ``"shared"`` or ``"synaptic"``; ``neuron``: the layer's neuron
    module; ``integer``: integer-delay inference (eval mode: delays rounded, σ = 0); ``grad``:
    autograd needed; ``engine``: the layer's option: ``"auto"`` (the first path of
    :data:`PATHS` that supports the configuration and is available: for the built-in LIF a
    fast path, for any other neuron ``"reference"``), ``"fast"`` (the same, but the built-in
    LIF is required) or a path name such as ``"reference"`` (that path, or an error saying why
    it can't run). ``state``: the layer runs a chunk from a state (a stateful path is needed).
    ``dtype``: the float type of the layer (the compiled paths take float32 and float64).
    ``reach``: returns the layer's :func:`kernel_reach`, asked (once) only where a path with a
    ``max_reach`` could run; ``"auto"`` passes over a path it exceeds. None: not checked.
    """
    if delay_type not in DELAY_TYPES:
        raise ValueError(f"delay_type must be one of {DELAY_TYPES}, got {delay_type!r}")
    reached = functools.cache(reach) if reach is not None else None

    def fits(path: EnginePath) -> bool:
        return reached is None or path.max_reach == math.inf or reached() < path.max_reach

    def runs(path: EnginePath) -> bool:
        return (
            path.supports(delay_type, neuron, integer, grad, state)
            and path.available(device, dtype)
            and fits(path)
        )

    if engine in PATHS:
        path = PATHS[engine]
        if not path.supports(delay_type, neuron, integer, grad, state):
            raise ValueError(
                f"engine path {engine!r} does not run {delay_type} delays with "
                f"{type(neuron).__name__}{' in integer-delay eval' if integer else ''}"
                f"{' with autograd' if grad else ''}{' from a state' if state else ''}; "
                "use engine='auto'"
            )
        if not path.available(device):
            raise RuntimeError(
                f"engine path {engine!r} is not available on {torch.device(device)} here; "
                "use engine='auto'"
            )
        if not path.available(device, dtype):
            raise TypeError(
                f"engine path {engine!r} takes {path.float_types}, not {dtype}; convert the "
                "layer and its input, or use engine='auto'"
            )
        if not fits(path):
            other = next((p.name for p in PATHS.values() if runs(p)), "reference")
            raise ValueError(
                f"engine path {engine!r} takes delays and half-widths with max|1 + d| + max w "
                f"below {path.max_reach:g} steps, this layer's reach {reached():g}; use "
                f"engine={other!r} (or 'auto', which does)"
            )
        return path
    check_engine(engine, neuron)
    for path in PATHS.values():
        if runs(path):
            return path
    raise RuntimeError(
        f"no engine path runs {delay_type} delays for {dtype} on {torch.device(device)}"
    )


__all__ = [
    "DELAY_TYPES",
    "MODES",
    "PATHS",
    "EnginePath",
    "RecurrentState",
    "check_engine",
    "kernel_reach",
    "reference_recurrence",
    "register",
    "select",
]

"""NIR (Neuromorphic Intermediate Representation) export and import of integer-delay networks.

Graph layout written by :func:`to_nir` (node names in brackets)::

    input → [layerL.synapses] → [layerL.lif] → … → [readout] → ([readout.li]) → output
    [layerL.lif] → [layerL.recurrent…] → [layerL.lif]             (DelRec layers: a cycle)

A projection with weights ``W`` ``(O, I)`` and integer lags ``(O, I)`` becomes

* one ``Affine`` (``Linear`` if it has no bias) when every lag is 0;
* ``Delay`` (one value per presynaptic neuron) → ``Affine``/``Linear`` when the lags depend
  only on the presynaptic neuron (axonal and shared delays);
* otherwise one ``[Delay →] Affine/Linear`` branch per distinct lag ``k`` holding the
  synapses with that lag (synaptic delays, feedforward delays); the bias goes to the branch
  of the smallest lag.

Time convention (also written into the graph's metadata): one step is ``dt`` seconds; every
node is evaluated once per step in graph order; an edge that closes a cycle delivers its
signal one step later, and a ``Delay`` of ``k·dt`` seconds adds ``k`` steps (zero history).
A ``LIF``/``LI`` node is the forward-Euler step of its ODE with step ``dt``::

    v[t] = v[t-1] + dt/τ · (v_leak − v[t-1] + r · I[t])

so delrec's ``v[t] = v[t-1] − (v[t-1] − v_reset)/τ_s + u[t]`` (``τ_s`` in steps) is exported as
``τ = τ_s·dt``, ``r = τ_s`` (``r = 1`` with ``decay_input``), ``v_leak = v_reset``. A LIF spikes
when ``v ≥ v_threshold`` (delrec and SpikingJelly; NIR's text says ``>``, which differs only at
exact equality) and then sets ``v = v_reset``; membranes start at ``v_reset`` (LI at 0).

What has no exact NIR form is refused with :class:`NIRExportError`: soft reset (NIR's LIF can
only reset to ``v_reset``), the adaptive LIF and any other neuron model. Batch norm is folded
into the affine weights and feedforward delays are expressed with ``Delay`` nodes, exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import delrec
from delrec.delays import MAX_DELAY
from delrec.deploy.report import hardware_report
from delrec.deploy.streaming import DelayedSynapses, StreamingLayer, StreamingNetwork
from delrec.deploy.targets import format_max_delay_check
from delrec.files import write_atomic
from delrec.models import READOUTS
from delrec.neurons import LIF, LeakyIntegrator

_NIR_MISSING = (
    "NIR support needs the `nir` package: pip install -e '.[deploy]' in the delrec checkout "
    "(make setup installs it), or pip install nir"
)


class NIRExportError(ValueError):
    """The network holds a construct NIR cannot express exactly; the message names it."""


class NIRImportError(ValueError):
    """The NIR graph does not have the shape :func:`to_nir` writes; the message says where."""


def _nir():
    try:
        import nir
    except ImportError:
        raise ImportError(_NIR_MISSING) from None
    return nir


TIME_CONVENTION = (
    "discrete time, one step = dt seconds; nodes are evaluated once per step in graph order; an "
    "edge closing a cycle delivers its signal one step later; a Delay of k*dt seconds adds k steps "
    "(zero history). LIF/LI nodes are forward-Euler steps with step dt: "
    "v[t] = v[t-1] + dt/tau*(v_leak - v[t-1] + r*I[t]), i.e. delrec's "
    "v[t] = v[t-1] - (v[t-1] - v_leak)/tau_steps + I[t] with tau = tau_steps*dt and r = tau_steps "
    "(r = 1: input also divided by tau_steps)."
)
SPIKE_CONVENTION = (
    "a LIF spikes when v >= v_threshold, then v = v_reset; membranes start at "
    "v_reset (LIF) or 0 (LI)"
)


# --------------------------------------------------------------------------- export
MAX_DT = 1e6  # seconds per step: far beyond any use, and time constants × dt stay finite


def to_nir(net: nn.Module, dt: float = 1.0, metadata: dict | None = None):
    """The ``nir.NIRGraph`` of a network (a ``SpikingNetwork`` or a ``StreamingNetwork``).

    ``dt``: seconds per time step (1.0 keeps time in steps). ``metadata``: more entries for
    the graph's metadata (what the input must be, e.g. ``input_standardization``), not those
    delrec writes itself. Raises :class:`NIRExportError` naming the layer and construct when
    something cannot be exported exactly.
    """
    nir = _nir()
    number = isinstance(dt, (int, float)) and not isinstance(dt, bool)
    if not (number and math.isfinite(dt) and 0 < dt <= MAX_DT):
        raise ValueError(
            f"dt must be a positive number of seconds per step, at most {MAX_DT:g} (time "
            f"constants and delays are multiplied by it), got {dt!r}"
        )
    if isinstance(net, StreamingNetwork):
        stream = net
    else:
        limit = hardware_report(net)["max_delay"]
        if not limit["pass"]:
            raise NIRExportError(
                f"{format_max_delay_check(limit)}: the network does not fit the chip it was "
                "trained for; clamp its delays (delrec.layers.clamp_delays) or retrain with "
                "--set network.max_delay=D, and check it with `delrec report RUN_DIR --target NAME`"
            )
        stream = StreamingNetwork.from_network(net)
    nodes = {"input": nir.Input(input_type={"input": np.array([stream.input_size])})}
    edges: list[tuple[str, str]] = []
    source = "input"
    for index, layer in enumerate(stream.layers):
        name = f"layer{index}.lif"
        nodes[name] = _lif_node(nir, layer.neuron, layer.size, dt, f"layer {index}")
        _add_projection(
            nir, nodes, edges, f"layer{index}.synapses", layer.synapses, source, name, dt
        )
        if layer.recurrent is not None:
            _add_projection(
                nir, nodes, edges, f"layer{index}.recurrent", layer.recurrent, name, name, dt
            )
        source = name
    target = "output"
    if stream.readout_neuron is not None:
        target = "readout.li"
        nodes[target] = _li_node(nir, stream.readout_neuron, stream.output_size, dt)
        edges.append((target, "output"))
    _add_projection(nir, nodes, edges, "readout", stream.readout, source, target, dt)
    nodes["output"] = nir.Output(output_type={"output": np.array([stream.output_size])})
    written = {
        "generator": f"delrec {delrec.__version__}",
        "dt": float(dt),
        "time_convention": TIME_CONVENTION,
        "spike_condition": SPIKE_CONVENTION,
        "readout_reduction": stream.readout_reduction or "none",
    }
    clash = sorted(set(metadata or {}) & set(written))
    if clash:
        raise ValueError(f"metadata {clash} is written by delrec itself; give other keys")
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=written | dict(metadata or {}))


def export_nir(
    net: nn.Module, path: str | os.PathLike, dt: float = 1.0, metadata: dict | None = None
):
    """Write the NIR graph of ``net`` (:func:`to_nir`, with ``dt`` and ``metadata``) to
    ``path`` (HDF5) and return the graph.

    The file is written beside ``path`` under a temporary name, read back and validated with
    ``nir.read``, then renamed: on any error nothing is left on disk and an existing file at
    ``path`` is untouched. A missing folder is created (:func:`delrec.files.write_atomic`).
    """
    nir = _nir()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_nir writes to a file path, got {type(path).__name__}")
    graph = to_nir(net, dt, metadata)
    path = Path(path)

    def write(temporary: Path) -> None:
        nir.write(temporary, graph)
        nir.read(temporary)  # nir's own reading and type checking

    write_atomic(path, write)
    return graph


def _lif_node(nir, neuron: nn.Module, size: int, dt: float, where: str):
    if not isinstance(neuron, LIF):
        kind = (
            "the adaptive LIF (AdLIF)"
            if type(neuron).__name__ == "AdLIF"
            else type(neuron).__name__
        )
        raise NIRExportError(
            f"{where}: {kind} has no NIR neuron node; NIR export supports LIF "
            "neurons with hard reset"
        )
    p = neuron.p
    if p.soft_reset:
        raise NIRExportError(
            f"{where}: LIF with soft reset (v -= threshold after a spike) has no NIR "
            "equivalent, NIR's LIF resets to v_reset; train with a hard reset to export "
            "(delrec train --set network.neuron.reset=hard)"
        )
    return nir.LIF(
        tau=_per_neuron(size, p.tau * dt),
        r=_per_neuron(size, 1.0 if p.decay_input else p.tau),
        v_leak=_per_neuron(size, p.v_reset),
        v_threshold=_per_neuron(size, p.v_threshold),
        v_reset=_per_neuron(size, p.v_reset),
    )


def _li_node(nir, neuron: LeakyIntegrator, size: int, dt: float):
    return nir.LI(
        tau=_per_neuron(size, neuron.tau * dt),
        r=_per_neuron(size, 1.0 if neuron.decay_input else neuron.tau),
        v_leak=_per_neuron(size, 0.0),
    )


def _per_neuron(size: int, value: float) -> np.ndarray:
    return np.full(size, float(value))


def _weight_node(nir, weight: torch.Tensor, bias: torch.Tensor | None):
    weight = weight.detach().cpu().numpy()
    if bias is None:
        return nir.Linear(weight=weight)
    return nir.Affine(weight=weight, bias=bias.detach().cpu().numpy())


def _add_projection(
    nir,
    nodes: dict,
    edges: list,
    name: str,
    synapses: DelayedSynapses,
    source: str,
    target: str,
    dt: float,
) -> None:
    """Add the nodes and edges of ``source → synapses → target`` (see the module docstring),
    without the delays of zero-weight synapses, which a chip drops."""
    used = synapses.weight != 0
    column = synapses.column_lags
    if column is not None:  # one lag per presynaptic neuron: 0 for one that sends nothing
        column = torch.where(used.any(0), column, torch.zeros_like(column))
    if synapses.max_lag == 0 or (column is not None and not bool(column.any())):
        nodes[name] = _weight_node(nir, synapses.weight, synapses.bias)
        edges += [(source, name), (name, target)]
    elif column is not None:
        nodes[f"{name}.delay"] = nir.Delay(delay=column.cpu().numpy() * float(dt))
        nodes[f"{name}.weight"] = _weight_node(nir, synapses.weight, synapses.bias)
        edges += [
            (source, f"{name}.delay"),
            (f"{name}.delay", f"{name}.weight"),
            (f"{name}.weight", target),
        ]
    else:  # one branch per lag of a kept synapse (non-zero weight), the bias on the first
        lags = synapses.lags
        kept = torch.unique(lags[used]).tolist() or [0]
        for rank, lag in enumerate(kept):
            weight = torch.where(lags == lag, synapses.weight, torch.zeros_like(synapses.weight))
            branch = f"{name}.lag{lag}"
            nodes[f"{branch}.weight"] = _weight_node(
                nir, weight, synapses.bias if rank == 0 else None
            )
            if lag == 0:
                edges.append((source, f"{branch}.weight"))
            else:
                nodes[f"{branch}.delay"] = nir.Delay(
                    delay=np.full(synapses.in_features, lag * float(dt))
                )
                edges += [(source, f"{branch}.delay"), (f"{branch}.delay", f"{branch}.weight")]
            edges.append((f"{branch}.weight", target))


# --------------------------------------------------------------------------- import
def import_nir(source, dt: float | None = None) -> StreamingNetwork:
    """A :class:`StreamingNetwork` running a NIR graph of the shape :func:`to_nir` writes.

    ``source``: a file path or a ``nir.NIRGraph``. ``dt``: seconds per step; by default the
    graph's ``dt`` metadata. Parameters are converted back to steps (``τ_s = τ/dt`` rounded to
    12 significant digits to undo the round-off of the conversion; lags ``= round(delay/dt)``,
    at most ``MAX_DELAY`` steps). Raises :class:`NIRImportError` where the file is not a
    readable NIR graph or the graph differs from that shape.
    """
    nir = _nir()
    if not isinstance(source, (str, os.PathLike, nir.NIRGraph)):
        raise TypeError(
            f"import_nir takes the path of a NIR file or a nir.NIRGraph, got "
            f"{type(source).__name__}"
        )
    graph = source if isinstance(source, nir.NIRGraph) else _read_graph(nir, source)
    if dt is None:
        if "dt" not in (graph.metadata or {}):
            raise NIRImportError("the graph has no 'dt' metadata; pass dt (seconds per step)")
        dt = graph.metadata["dt"]
    given = dt
    try:
        dt = math.nan if isinstance(dt, (bool, np.bool_)) else float(dt)
    except (TypeError, ValueError):
        dt = math.nan
    if not (math.isfinite(dt) and dt > 0):
        raise NIRImportError(
            f"dt = {given!r} is not a positive number of seconds per step; pass dt"
        )
    successors: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for pre, post in graph.edges:
        missing = next((n for n in (pre, post) if n not in graph.nodes), None)
        if missing is not None:
            raise NIRImportError(f"the edge {pre!r} → {post!r} names a node {missing!r} it lacks")
        successors[pre].append(post)
    inputs = [name for name, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(inputs) != 1:
        raise NIRImportError(
            f"expected one Input node, found {len(inputs)}: {inputs} (a node without incoming "
            "edges counts as one: is a node left unconnected?)"
        )
    dtype = _weight_dtype(nir, graph)

    layers, source_name, visited = [], inputs[0], {inputs[0]}
    while True:
        branches = [
            _follow_branch(nir, graph, successors, source_name, first, dt, dtype)
            for first in successors[source_name]
        ]
        recurrent = [b for b in branches if b[0] == source_name]
        forward = [b for b in branches if b[0] != source_name]
        if layers:
            loop = _merge_branches(recurrent, source_name) if recurrent else None
            synapses = layers[-1].synapses
            if loop is not None:
                _check_shape(graph, loop, source_name, source_name)
                if loop.bias is not None:  # the same current every step: the layer's own bias
                    bias = loop.bias if synapses.bias is None else synapses.bias + loop.bias
                    synapses = DelayedSynapses(synapses.weight, synapses.lags, bias)
                    loop = DelayedSynapses(loop.weight, loop.lags)
            layers[-1] = StreamingLayer(synapses, layers[-1].neuron, loop)
        elif recurrent:
            raise NIRImportError(f"the Input node {source_name!r} feeds back to itself")
        targets = {b[0] for b in forward}
        if len(targets) != 1:
            raise NIRImportError(
                f"node {source_name!r} feeds {sorted(targets) or 'nothing'}; expected "
                "exactly one next neuron layer (or the output)"
            )
        target = targets.pop()
        if target in visited:  # a loop through several layers: no chain of layers
            raise NIRImportError(
                f"node {target!r} is reached again from {source_name!r}: the graph loops "
                "through several layers; expected a chain of layers, each recurrent at most "
                "onto itself"
            )
        visited.add(target)
        synapses = _merge_branches(forward, source_name)
        _check_shape(graph, synapses, source_name, target)
        node = graph.nodes[target]
        if isinstance(node, nir.LIF):
            layers.append(StreamingLayer(synapses, _lif_from_node(node, dt, target)))
            source_name = target
            continue
        readout_neuron = None
        if isinstance(node, nir.LI):
            readout_neuron = _li_from_node(node, dt, target)
            if [type(graph.nodes[n]) for n in successors[target]] != [nir.Output]:
                raise NIRImportError(
                    f"the readout LI node {target!r} must feed only the Output node"
                )
            output = successors[target][0]
            if _width(graph.nodes[output]) != _width(node):
                raise NIRImportError(
                    f"the Output node {output!r} has {_width(graph.nodes[output])} values, "
                    f"but the readout LI node {target!r} feeding it has {_width(node)} neurons"
                )
        elif not isinstance(node, nir.Output):
            raise NIRImportError(
                f"node {target!r} is a {type(node).__name__}; expected LIF, LI or Output"
            )
        if synapses.max_lag:
            raise NIRImportError(f"the readout into {target!r} has delays; expected none")
        reduction = str((graph.metadata or {}).get("readout_reduction", "none"))
        if reduction not in (*READOUTS, "none"):
            raise NIRImportError(
                f"readout_reduction {reduction!r} in the graph's metadata is none of "
                f"{(*READOUTS, 'none')}"
            )
        _check_connected(nir, graph, successors, inputs[0])
        return StreamingNetwork(
            layers, synapses, readout_neuron, None if reduction == "none" else reduction
        )


def _read_graph(nir, path: str | os.PathLike):
    """``nir.read(path)``, its failures on a file that is not NIR as :class:`NIRImportError`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a NIR file")
    if not path.is_file():
        raise FileNotFoundError(f"no NIR file at {path}")
    try:
        return nir.read(path)
    except Exception as error:  # h5py and nir raise OSError, KeyError, ValueError … on bad files
        raise NIRImportError(
            f"{path} is not a readable NIR file ({type(error).__name__}: {error}); it may be "
            "truncated or another kind of file: write it again with `delrec export` or nir.write"
        ) from None


def _check_connected(nir, graph, successors: dict, source: str) -> None:
    """A NIRImportError unless every node is reached from the Input node ``source`` and no
    Output node feeds another node: an edge the importer would not follow changes the network."""
    reached, todo = {source}, [source]
    while todo:
        for name in successors[todo.pop()]:
            if name not in reached:
                reached.add(name)
                todo.append(name)
    unreached = [name for name in graph.nodes if name not in reached]
    if unreached:
        raise NIRImportError(
            f"nodes {unreached} are not reached from the Input node {source!r}; remove them "
            "or connect them"
        )
    for name, node in graph.nodes.items():
        if isinstance(node, nir.Output) and successors[name]:
            raise NIRImportError(
                f"the Output node {name!r} feeds {successors[name]}; an Output node ends the graph"
            )


def _numbers(node, field: str, where: str) -> np.ndarray:
    """The node's ``field`` as a float64 array, or a NIRImportError unless it holds numbers."""
    values = np.asarray(getattr(node, field))
    if values.dtype.kind not in "biuf":
        raise NIRImportError(f"{where}: {field} holds values of type {values.dtype}, not numbers")
    return values.astype(np.float64)


def _weight_dtype(nir, graph) -> torch.dtype:
    """The stream's dtype: float64 if any weight or bias is stored in float64, else float32
    (also for integer or float16 weights), so that every layer runs in one dtype."""
    wide = False
    for name, node in graph.nodes.items():
        if isinstance(node, (nir.Affine, nir.Linear)):
            for field in ("weight", "bias") if isinstance(node, nir.Affine) else ("weight",):
                _numbers(node, field, name)
                wide |= np.asarray(getattr(node, field)).dtype == np.float64
    return torch.float64 if wide else torch.float32


def _follow_branch(nir, graph, successors, source: str, first: str, dt: float, dtype: torch.dtype):
    """``source → [Delay] → Affine/Linear → target`` as ``(target, lags (I,), weight, bias)``,
    the weights and bias in ``dtype``."""
    name, lags = first, None
    if isinstance(graph.nodes[name], nir.Delay):
        steps = _numbers(graph.nodes[name], "delay", name) / dt
        if not (np.abs(steps) <= MAX_DELAY).all():  # False for NaN too
            worst = steps[~(np.abs(steps) <= MAX_DELAY)].flat[0]
            raise NIRImportError(
                f"Delay node {name!r} holds a delay of {worst:g} steps (at dt = {dt} s); delrec "
                f"runs delays of at most MAX_DELAY = {MAX_DELAY:g} steps: check the graph's "
                "delays and its dt (pass dt= if the metadata is wrong)"
            )
        lags = np.rint(steps)
        if (lags < 0).any() or not np.allclose(steps, lags, rtol=0, atol=1e-6):
            raise NIRImportError(
                f"Delay node {name!r} holds delays that are not whole, non-negative "
                f"multiples of dt = {dt}"
            )
        name = _single_successor(successors, name)
    node = graph.nodes[name]
    if isinstance(node, nir.Output) and isinstance(graph.nodes[source], nir.LIF):
        raise NIRImportError(
            f"the graph's output is the spikes of LIF {source!r}; delrec networks end in a "
            "readout, Affine/Linear (into an LI, optionally) before the Output node: add one"
        )
    if not isinstance(node, (nir.Affine, nir.Linear)):
        raise NIRImportError(
            f"after {source!r} expected [Delay →] Affine/Linear, found "
            f"{type(node).__name__} node {name!r}"
        )
    weight = torch.from_numpy(_numbers(node, "weight", name)).to(dtype)
    if weight.dim() != 2:
        raise NIRImportError(f"weight of {name!r} must be 2-D, got shape {tuple(weight.shape)}")
    bias = torch.from_numpy(_numbers(node, "bias", name)) if isinstance(node, nir.Affine) else None
    if not all(torch.isfinite(v).all() for v in (weight, *([] if bias is None else [bias]))):
        raise NIRImportError(f"node {name!r} holds NaN or infinite weights or biases")
    if lags is not None and lags.shape != (weight.shape[1],):
        raise NIRImportError(
            f"Delay before {name!r} has shape {lags.shape}, expected ({weight.shape[1]},)"
        )
    lag_tensor = (
        torch.zeros(weight.shape[1], dtype=torch.long)
        if lags is None
        else torch.from_numpy(lags).long()
    )
    bias = None if bias is None else bias.to(dtype)
    return _single_successor(successors, name), lag_tensor, weight, bias


def _single_successor(successors, name: str) -> str:
    if len(successors[name]) != 1:
        raise NIRImportError(f"node {name!r} must feed exactly one node, feeds {successors[name]}")
    return successors[name][0]


def _width(node) -> int:
    """Neurons of a LIF or LI node, values of an Input or Output node."""
    if hasattr(node, "tau"):
        return int(np.asarray(node.tau).size)
    shapes = node.input_type if "input" in node.input_type else node.output_type
    return int(np.prod(next(iter(shapes.values()))))


def _check_shape(graph, synapses: DelayedSynapses, source: str, target: str) -> None:
    """A NIRImportError unless the weights from ``source`` to ``target`` are (their widths)."""
    want = (_width(graph.nodes[target]), _width(graph.nodes[source]))
    if tuple(synapses.weight.shape) != want:
        raise NIRImportError(
            f"the weights from {source!r} to {target!r} are {tuple(synapses.weight.shape)}, "
            f"but the nodes have {want[1]} and {want[0]} values: expected {want}"
        )


def _merge_branches(branches, source: str) -> DelayedSynapses:
    """Sum the branches from ``source`` into one projection with a lag per synapse: parallel
    branches of one delay add their weights (as NIR sums them); one synapse in two branches of
    different delays has no single lag and is refused."""
    shapes = {tuple(b[2].shape) for b in branches}
    if len(shapes) != 1:
        raise NIRImportError(
            f"the branches leaving {source!r} have different weight shapes {sorted(shapes)}"
        )
    weight = torch.zeros_like(branches[0][2])
    lags = torch.zeros(weight.shape, dtype=torch.long)
    owner = torch.zeros(weight.shape, dtype=torch.bool)
    bias = None
    for _, column_lags, branch_weight, branch_bias in branches:
        used = branch_weight != 0
        branch_lags = column_lags.expand_as(lags)
        clash = used & owner & (lags != branch_lags)
        if clash.any():
            o, i = (int(v) for v in clash.nonzero()[0])
            raise NIRImportError(
                f"synapse {i} -> {o} leaving {source!r} appears in two branches with different "
                f"delays ({int(lags[o, i])} and {int(branch_lags[o, i])} steps); delrec runs one "
                "delay per synapse"
            )
        weight = weight + torch.where(used, branch_weight, torch.zeros_like(weight))
        lags = torch.where(used, branch_lags, lags)
        owner |= used
        if branch_bias is not None:
            bias = branch_bias if bias is None else bias + branch_bias
    try:
        return DelayedSynapses(weight, lags, bias)
    except ValueError as error:
        raise NIRImportError(f"the synapses leaving {source!r}: {error}") from None


def _uniform(node, field: str, where: str) -> float:
    """The one value of the node's per-neuron ``field``, or a NIRImportError unless it holds
    one finite value per neuron (as many as ``tau``), all equal."""
    values = _numbers(node, field, where).reshape(-1)
    if values.size != _width(node):
        raise NIRImportError(
            f"{where}: {field} holds {values.size} values for the node's {_width(node)} "
            "neurons (the size of tau); expected one per neuron"
        )
    if not np.isfinite(values).all():
        raise NIRImportError(f"{where}: {field} holds NaN or Inf")
    if values.size == 0 or not (values == values[0]).all():
        raise NIRImportError(
            f"{where}: per-neuron values of {field} are not supported (delrec "
            "neurons share one value per layer)"
        )
    return float(values[0])


def _steps(seconds: float, dt: float) -> float:
    return float(f"{seconds / dt:.12g}")


def _input_scaling(node, tau_steps: float, where: str) -> bool:
    """``decay_input`` from the node's ``r``: ``r = τ_s`` → False, ``r = 1`` → True."""
    r = _uniform(node, "r", where)
    if math.isclose(r, tau_steps, rel_tol=1e-9):
        return False
    if math.isclose(r, 1.0, rel_tol=1e-9):
        return True
    raise NIRImportError(
        f"{where}: r = {r} is neither tau/dt = {tau_steps} nor 1, which delrec's "
        "neurons cannot express; if the graph was written with another dt than the one used "
        "here, pass dt (seconds per step)"
    )


def _time_constant(node, dt: float, where: str) -> float:
    """The node's ``tau`` in steps, or a NIRImportError unless it is positive."""
    tau = _steps(_uniform(node, "tau", where), dt)
    if not tau > 0:
        raise NIRImportError(f"{where}: tau = {tau} steps; a time constant must be positive")
    return tau


def _lif_from_node(node, dt: float, where: str) -> LIF:
    tau = _time_constant(node, dt, where)
    v_reset = _uniform(node, "v_reset", where)
    if _uniform(node, "v_leak", where) != v_reset:
        raise NIRImportError(
            f"{where}: v_leak differs from v_reset; delrec's LIF leaks towards v_reset"
        )
    decay_input = _input_scaling(node, tau, where)
    try:
        return LIF(
            tau=tau,
            v_threshold=_uniform(node, "v_threshold", where),
            v_reset=v_reset,
            decay_input=decay_input,
        )
    except ValueError as error:
        raise NIRImportError(f"{where}: {error}") from None


def _li_from_node(node, dt: float, where: str) -> LeakyIntegrator:
    tau = _time_constant(node, dt, where)
    if _uniform(node, "v_leak", where) != 0:
        raise NIRImportError(f"{where}: a readout LI must leak towards 0")
    decay_input = _input_scaling(node, tau, where)
    try:
        return LeakyIntegrator(tau, decay_input=decay_input)
    except ValueError as error:
        raise NIRImportError(f"{where}: {error}") from None

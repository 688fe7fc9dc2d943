"""Integer-delay streaming inference: a trained network run a step or a chunk at a time.

A :class:`StreamingNetwork` is what a neuromorphic chip runs: every delay is an integer
number of steps, batch norm is folded into the weights and dropout is gone. It reproduces
``net.eval()`` on the whole sequence (docs/design.md#integer-delay-mode) spike for spike, and it
is also what :func:`delrec.deploy.import_nir` builds from a NIR file.

It is a thin driver: each layer runs a chunk from its state on the engine the recurrent layer
itself runs in eval (docs/design.md#state-and-chunks). A built-in LIF layer on the CPU is one
call of the compiled integer-delay loop (:class:`delrec.engine.ring.IntegerLayer`, which the
recurrent layer's ``cpp-ring`` path runs too); any other layer reads its feedforward synapses
(:meth:`delrec.engine.ring.DelayedSynapses.run`) and runs its neurons and recurrence on the
engine path :func:`delrec.engine.select` picks for integer delays, from a state.

Conventions (time in steps):

* a feedforward projection computes ``c_i[t] = Σ_j W_ij x_j[t - lag_ij] + b_i``;
* a recurrent projection (DelRec) computes ``r_i[t] = Σ_j W_ij s_j[t - 1 - lag_ij]``: the
  loop itself takes one step and ``lag = round(d)`` more (axonal delays: ``lag_ij = d_j``);
* histories before ``t = 0`` are zero; neurons start from their ``initial_state``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from delrec.delays import integer_delays
from delrec.engine import FLOATS, RecurrentState, native, select
from delrec.engine.lif import LIFMap, is_builtin_lif
from delrec.engine.ring import DelayedSynapses, IntegerLayer, run_stack
from delrec.engine.state import history_length
from delrec.layers import DelRec, FeedforwardDelay
from delrec.layers.sizes import check_size
from delrec.neurons import (
    LeakyIntegrator,
    as_neuron,
    first_nonfinite,
    leaky_integrator_run,
    run_steps,
)

# What a stream is built from: the tensors of its synapses, the settings of its neurons (a
# built-in neuron's parameters ``p``, a readout integrator's ``tau`` and ``decay_input``)
TENSORS = ("weight", "lags", "bias")
SETTINGS = ("p", "tau", "decay_input")
_version = operator.attrgetter("_version")  # a tensor's count of in-place changes


class LayerState(NamedTuple):
    """A streaming layer's state: ``inputs``, its last ``max_lag`` input frames ``(Hf, B, I)``;
    ``neuron``, its neurons' state tuple (``(v,)`` ``(B, N)`` for LIF and the readout);
    ``spikes``, its last spikes ``(Hr, B, N)`` (``Hr = 0`` without recurrence). Oldest first."""

    inputs: Tensor
    neuron: tuple[Tensor, ...]
    spikes: Tensor


class StreamingLayer(nn.Module):
    """One hidden layer: ``c = synapses(x)``, ``u = c + recurrent(s)``, ``s = neuron.step(u)``.

    ``synapses`` and ``recurrent`` are :class:`DelayedSynapses` (``recurrent`` is ``None`` for a
    feedforward layer); ``neuron`` follows :class:`delrec.neurons.Neuron`. What is built from
    them (the history length, the compiled loop) is built again when they change
    (:meth:`refresh`).
    """

    def __init__(
        self, synapses: DelayedSynapses, neuron: nn.Module, recurrent: DelayedSynapses | None = None
    ):
        super().__init__()
        if recurrent is not None and recurrent.weight.shape != (synapses.out_features,) * 2:
            raise ValueError(
                f"recurrent weights must be ({synapses.out_features}, "
                f"{synapses.out_features}), got {tuple(recurrent.weight.shape)}"
            )
        if recurrent is not None and recurrent.bias is not None:
            raise ValueError(
                "the recurrent synapses have a bias, which the recurrent loop does not add: it "
                "adds the same current every step, so give it to the feedforward synapses "
                "(their bias plus this one) and none to the recurrent ones"
            )
        self.synapses, self.neuron, self.recurrent = synapses, as_neuron(neuron), recurrent
        self._built_from: tuple | None = None
        self.refresh()

    def sources(self) -> tuple:
        """What the layer is built from: its synapses' tensors (:meth:`DelayedSynapses.sources`)
        and its neurons' settings."""
        modules = self._modules
        recurrent = modules.get("recurrent")  # None: a plain attribute
        return (
            modules["synapses"].sources(),
            None if recurrent is None else recurrent.sources(),
            getattr(modules["neuron"], "p", None),
        )

    def refresh(self, force: bool = False) -> bool:
        """Derive the history length again and drop the compiled loop if the layer's tensors or
        neurons changed since (an in-place edit, ``load_state_dict``, a move) or ``force``;
        whether it did."""
        if not force and self.sources() == self._built_from:
            return False
        for synapses in (self.synapses, self.recurrent):
            if synapses is not None:
                synapses.refresh(force)
        # steps of spikes the recurrence reaches back: the rows of the state's spike history
        rec = self.recurrent
        self.history = 0 if rec is None else history_length(self.recurrent_delay()[1], 1.0)
        self._compiled = None
        self._built_from = self.sources()
        return True

    @property
    def size(self) -> int:
        return self.synapses.out_features

    def recurrent_delay(self) -> tuple[str, Tensor]:
        """The recurrence as a DelRec layer's engine sees it: the delay type and the integer
        delays, ``(N,)`` per presynaptic neuron (``"axonal"``) or ``(N, N)``."""
        lags = self.recurrent.column_lags
        if lags is not None:
            return "axonal", lags.to(self.recurrent.weight.dtype)
        return "synaptic", self.recurrent.lags.to(self.recurrent.weight.dtype)

    def initial_state(self, batch_size: int) -> LayerState:
        """Zero histories and the neurons' initial state for ``batch_size`` streams."""
        self.refresh()
        like = self.synapses.weight.new_zeros(batch_size, self.size)
        return LayerState(
            self.synapses.weight.new_zeros(
                self.synapses.max_lag, batch_size, self.synapses.in_features
            ),
            tuple(self.neuron.initial_state(like)),
            like.new_zeros(self.history, batch_size, self.size),
        )

    def __getstate__(self) -> dict:
        """For copy and pickle: without the compiled loop (it holds the kernel module), which
        the copy builds again."""
        return {**super().__getstate__(), "_compiled": None, "_built_from": None}

    def compiled(self, device: torch.device) -> IntegerLayer | None:
        """The compiled loop of this layer (built-in LIF on the CPU, float32 or float64, kernels
        built), or None: the layer then runs on PyTorch ops."""
        self.refresh()
        compilable = device.type == "cpu" and self.synapses.weight.dtype in FLOATS
        if not (compilable and is_builtin_lif(self.neuron)):
            return None
        if self._compiled is None and native.load("ring") is not None:
            recurrent = None
            if self.recurrent is not None:
                _, delay = self.recurrent_delay()
                recurrent = (self.recurrent.weight, 1 + delay.long())
            lif = LIFMap.of(self.neuron.p)
            self._compiled = IntegerLayer(self.size, self.synapses, recurrent, lif=lif)
        return self._compiled

    def advance(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Spikes ``(T, B, N)`` of the inputs ``x`` ``(T, B, I)`` from ``state``, and the state
        after them (the compiled loop updates the state's tensors in place)."""
        compiled = self.compiled(x.device)  # refreshed first
        if compiled is not None:
            v = state.neuron[0]
            spikes, *_ = compiled.run(
                x, v, state.inputs, state.spikes, into=(v, state.inputs, state.spikes)
            )
            return spikes, state
        current, inputs = self.synapses.run(x, state.inputs)
        if self.recurrent is None:
            spikes, neuron = run_steps(self.neuron, current, state.neuron)
            return spikes, LayerState(inputs, neuron, state.spikes)
        delay_type, delay = self.recurrent_delay()
        path = select(
            delay_type,
            self.neuron,
            device=x.device,
            integer=True,
            grad=False,
            state=True,
            dtype=x.dtype,
        )
        spikes, recurrent = path.run(
            current,
            self.recurrent.weight,
            delay,
            1.0,
            self.neuron,
            None,
            state=RecurrentState(state.neuron, state.spikes),
        )
        return spikes, LayerState(inputs, recurrent.neuron, recurrent.spikes)


@dataclass
class StreamState:
    """Everything a stream remembers between steps (updated in place by each call).

    ``t``: steps consumed so far. ``layers[l]``: the :class:`LayerState` of hidden layer ``l``;
    ``readout``: the readout's (its neuron state is the leaky integrator's ``(v,)`` ``(B, K)``,
    the last output without one). ``spikes[l]``: the latest spikes ``(B, N_l)``.
    """

    t: int
    layers: list[LayerState]
    readout: LayerState
    spikes: list[Tensor]

    @property
    def batch_size(self) -> int:
        return self.readout.inputs.shape[1]


class StreamingNetwork(nn.Module):
    """A spiking network run a step or a chunk at a time with integer delays (see the module
    docstring).

    ``layers``: hidden :class:`StreamingLayer` s in depth order; ``readout``: zero-lag
    :class:`DelayedSynapses` to the ``K`` outputs; ``readout_neuron``: a
    :class:`~delrec.neurons.LeakyIntegrator` whose membrane is the output, or ``None`` (the
    readout current is the output). ``readout_reduction`` names how the output sequence becomes
    a prediction (:func:`delrec.models.readout_reduce`), when known.

    Usage::

        stream = StreamingNetwork.from_network(net)
        state = stream.initial_state(batch_size=1)
        for x_t in live_input:                 # (C,) or (B, C)
            y_t = stream.step(x_t, state)      # (K,) or (B, K); state.spikes has the spikes
        y, spikes = stream.advance(x, state)   # or a chunk (T, B, C) at a time
    """

    def __init__(
        self,
        layers: list[StreamingLayer],
        readout: DelayedSynapses,
        readout_neuron: LeakyIntegrator | None = None,
        readout_reduction: str | None = None,
    ):
        super().__init__()
        if readout.max_lag != 0:
            raise ValueError("the readout synapses must have zero lags")
        if readout_neuron is not None and not isinstance(readout_neuron, LeakyIntegrator):
            raise TypeError(
                f"readout_neuron must be a LeakyIntegrator or None, "
                f"got {type(readout_neuron).__name__}"
            )
        fan_in = layers[0].synapses.in_features if layers else readout.in_features
        for index, layer in enumerate([*layers, None]):
            synapses = layer.synapses if layer is not None else readout
            if synapses.in_features != fan_in:
                name = f"layer {index}" if layer is not None else "the readout"
                raise ValueError(
                    f"{name} expects {synapses.in_features} inputs but receives {fan_in}"
                )
            fan_in = synapses.out_features
        self.layers = nn.ModuleList(layers)
        self.readout = readout
        self.readout_neuron = readout_neuron
        self.readout_reduction = readout_reduction
        self.input_size = (layers[0].synapses if layers else readout).in_features
        self.output_size = readout.out_features
        self._stack: list[IntegerLayer] | None = None  # built on first use
        self._state_shapes: dict[int, list] = {}  # batch size → the state's history shapes
        self._checked = None  # (state, dtype, device, its layer states) last found to fit
        self._source_slots: tuple | None = None  # where _sources looks
        self._built_from = self._sources()

    def _sources(self) -> tuple:
        """What the stream is built from, cheap enough for every step (under 10 µs): the identity,
        version and storage of every synapse tensor, and the settings of every neuron."""
        if self._source_slots is None:  # the modules' dicts, whose entries edits replace
            synapses = [self.readout]
            synapses += [s for layer in self.layers for s in (layer.synapses, layer.recurrent)]
            neurons = [layer.neuron for layer in self.layers] + [self.readout_neuron]
            tensors = [
                (s._buffers, name)
                for s in synapses
                if s is not None
                for name in TENSORS
                if name in s._buffers  # None too: a bias set to None, or back, is an edit
            ]
            settings = [(n.__dict__, name) for n in neurons if n is not None for name in SETTINGS]
            self._source_slots = (
                *([slot[k] for slot in tensors] for k in (0, 1)),
                *([slot[k] for slot in settings] for k in (0, 1)),
            )
        where, names, settings_where, settings = self._source_slots
        tensors = list(map(dict.get, where, names))  # the loops in C: this runs every step
        present = [t for t in tensors if t is not None]
        return (
            tuple(map(id, tensors)),
            tuple(map(_version, present)),
            tuple(map(Tensor.data_ptr, present)),
            tuple(map(dict.get, settings_where, settings)),
        )

    def __getstate__(self) -> dict:
        """For copy and pickle: without the compiled loops, which the copy builds again."""
        cleared = dict.fromkeys(("_stack", "_checked", "_source_slots", "_built_from"))
        return {**super().__getstate__(), **cleared}

    def refresh(self, force: bool = False) -> bool:
        """Build again what was built from the stream's tensors and settings if they changed
        since (an in-place edit such as quantising the weights, ``load_state_dict``, ``.data =``,
        a move) or ``force``: the layers' derived data, the compiled loops, the expected state
        shapes; whether it did. Every method that runs the stream calls it; call
        ``refresh(force=True)`` after an in-place edit through ``.data``, which PyTorch does not
        count as a change."""
        if not force and self._sources() == self._built_from:
            return False
        for layer in self.layers:
            layer.refresh(force)
        self.readout.refresh(force)
        if self.readout.max_lag != 0:
            raise ValueError("the readout synapses must have zero lags")
        self._stack, self._state_shapes, self._checked = None, {}, None
        self._built_from = self._sources()
        return True

    # ------------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_network(cls, net: nn.Module) -> StreamingNetwork:
        """Integer-delay streaming copy of a :class:`~delrec.models.SpikingNetwork`.

        DelRec delays are rounded as in eval mode (half to even, at least 0); feedforward
        delay positions are rounded and a synapse whose rounded position leaves the window is
        dropped, as :class:`FeedforwardDelay` does in eval; batch norm is folded into the
        weights from its running statistics; dropout is removed. ``net`` is not modified.
        """
        for name in ("blocks", "readout", "readout_neuron"):
            if not hasattr(net, name):
                raise TypeError(
                    f"{type(net).__name__} is not a delrec SpikingNetwork "
                    f"(no .{name}); build it with delrec.models.build_network"
                )
        check_deployable(net)
        layers = []
        for index, block in enumerate(net.blocks):
            weight, lags, bias = _synapse_tensors(block.synapses, f"layer {index}")
            if block.norm is not None:
                weight, bias = _fold_batch_norm(block.norm, weight, bias, f"layer {index}")
            if isinstance(block.neurons, DelRec):
                layer = block.neurons
                delay = (
                    layer.delay.expand(layer.size) if layer.delay_type == "shared" else layer.delay
                )
                rec_lags = integer_delays(delay).long()
                if rec_lags.dim() == 1:  # axonal: one delay per presynaptic neuron
                    rec_lags = rec_lags.expand(layer.size, layer.size)
                recurrent = DelayedSynapses(layer.weight, rec_lags)
                neuron = copy.deepcopy(layer.neuron)
            else:
                recurrent, neuron = None, copy.deepcopy(as_neuron(block.neurons))
            layers.append(StreamingLayer(DelayedSynapses(weight, lags, bias), neuron, recurrent))
        weight, lags, bias = _synapse_tensors(net.readout, "the readout")
        if lags.any():
            raise ValueError("the readout must be an nn.Linear (no delays)")
        readout_neuron = copy.deepcopy(net.readout_neuron)
        config = getattr(net, "config", None)
        return cls(
            layers,
            DelayedSynapses(weight, lags, bias),
            readout_neuron,
            getattr(config, "readout", None),
        )

    # ------------------------------------------------------------------ running
    def initial_state(self, batch_size: int = 1) -> StreamState:
        """A fresh state for ``batch_size`` parallel streams (zero histories)."""
        batch_size = check_size(batch_size, "batch_size")
        self.refresh()
        weight = self.readout.weight
        return StreamState(
            t=0,
            layers=[layer.initial_state(batch_size) for layer in self.layers],
            readout=LayerState(
                weight.new_zeros(0, batch_size, self.readout.in_features),
                (weight.new_zeros(batch_size, self.output_size),),
                weight.new_zeros(0, batch_size, self.output_size),
            ),
            spikes=[weight.new_zeros(batch_size, layer.size) for layer in self.layers],
        )

    def step(self, x_t: Tensor, state: StreamState) -> Tensor:
        """Consume one input frame ``(B, C)`` (or ``(C,)`` for one stream) and return the
        output of this step, ``(B, K)`` (or ``(K,)``). ``state`` is advanced in place."""
        self._check_arguments(x_t, state)
        unbatched = x_t.dim() == 1
        x = x_t.view(1, 1, -1) if unbatched else x_t.unsqueeze(0)
        if x.dim() != 3 or x.shape[1:] != (state.batch_size, self.input_size):
            raise ValueError(
                f"expected one frame of shape ({state.batch_size}, {self.input_size})"
                + (f" or ({self.input_size},)" if state.batch_size == 1 else "")
                + f", got {tuple(x_t.shape)}; make the state with "
                "initial_state(batch_size)"
            )
        out = self._advance(x, state)[0]
        return out.view(-1) if unbatched else out[0]

    def advance(self, x: Tensor, state: StreamState) -> tuple[Tensor, list[Tensor]]:
        """Consume a chunk ``(T, B, C)`` and return its outputs ``(T, B, K)`` and each layer's
        spikes ``(T, B, N_l)``; ``state`` is advanced in place, as by ``T`` calls of
        :meth:`step` (``T = 0``: nothing happens)."""
        self._check_arguments(x, state)
        if x.dim() != 3 or x.shape[1:] != (state.batch_size, self.input_size):
            raise ValueError(
                f"expected a chunk of shape (T, {state.batch_size}, {self.input_size}), got "
                f"{tuple(x.shape)}; make the state with initial_state(batch_size)"
            )
        return self._advance(x, state)

    def _check_arguments(self, x: Tensor, state: StreamState) -> None:
        """A TypeError or ValueError unless ``x`` is a tensor and ``state`` is one this stream
        made (:meth:`initial_state`) and advanced: its histories have the rows this stream's
        delays reach, its readout membrane the network's dtype and device. A state of another
        network would otherwise run without a word, its missing history read as zeros, and
        its tensors finite. The state checked last passes at once (a live stream's step),
        unless the stream moved or one of its layer states was replaced since."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"the input must be a torch.Tensor, got {type(x).__name__}; convert it with "
                "torch.as_tensor(x, dtype=..., device=...)"
            )
        self.refresh()
        if not isinstance(state, StreamState):
            raise TypeError(
                f"state must be a StreamState made by this stream's initial_state(batch_size), "
                f"got {type(state).__name__}"
            )
        weight = self.readout.weight
        layers = [*state.layers, state.readout]
        last = self._checked
        if (
            last is not None
            and last[0] is state
            and last[1:3] == (weight.dtype, weight.device)
            and len(last[3]) == len(layers)
            and all(map(operator.is_, last[3], layers))
        ):
            return  # the state checked last, unchanged but for this stream's own steps
        problem = self._state_problem(state, layers)
        if problem is not None:
            raise ValueError(
                f"this state was not made by this stream: {problem}; make one with "
                "initial_state(batch_size) (a stream changed since, or another network's "
                "state, would read wrong or missing histories)"
            )
        self._check_finite(layers)
        self._checked = (state, weight.dtype, weight.device, layers)

    def _state_problem(self, state: StreamState, layers: list[LayerState]) -> str | None:
        """What in ``state`` (its ``layers``: the hidden ones, then the readout's) does not fit
        this stream, or None: the number of layers, each history's and membrane's shape, the
        dtype and device of every tensor."""
        if len(layers) != len(self.layers) + 1 or len(state.spikes) != len(self.layers):
            return f"{len(state.layers)} hidden layers, the stream has {len(self.layers)}"
        batch = state.batch_size
        if batch not in self._state_shapes:  # per layer and the readout: (inputs, spikes, v)
            rows = [(layer.synapses.max_lag, layer.history) for layer in self.layers]
            widths = [(layer.synapses.in_features, layer.size) for layer in self.layers]
            self._state_shapes[batch] = [
                ((lag, batch, inputs), (history, batch, size), (batch, size))
                for (lag, history), (inputs, size) in zip(
                    [*rows, (0, 0)], [*widths, (self.readout.in_features, self.output_size)]
                )
            ]
        weight = self.readout.weight
        for index, (layer, (inputs, spikes, neuron)) in enumerate(
            zip(layers, self._state_shapes[batch])
        ):
            name = _state_name(index, len(layers))
            got = (tuple(layer.inputs.shape), tuple(layer.spikes.shape))
            if got != (inputs, spikes):
                return (
                    f"{name} holds histories of inputs {got[0]} and spikes {got[1]}, "
                    f"the stream's delays need {inputs} and {spikes}"
                )
            membranes = [tuple(v.shape) for v in layer.neuron]
            if any(shape != neuron for shape in membranes):
                return f"{name} holds a neuron state of shapes {membranes}, the stream's {neuron}"
            for tensor in (*layer.neuron, layer.inputs, layer.spikes):
                if tensor.dtype != weight.dtype or tensor.device != weight.device:
                    return (
                        f"{name} holds {tensor.dtype} on {tensor.device}, the stream's "
                        f"{weight.dtype} on {weight.device} (was the stream moved with .to() "
                        "after the state was made?)"
                    )
        return None

    @staticmethod
    def _check_finite(layers: list[LayerState]) -> None:
        """A ValueError naming the first NaN or Inf in a state's membranes or histories: from
        there on it would silence a layer (or flood it) without a word."""
        for index, layer in enumerate(layers):
            name = _state_name(index, len(layers))
            for field, tensor in (
                *((f"neuron[{i}]", t) for i, t in enumerate(layer.neuron)),
                ("inputs", layer.inputs),
                ("spikes", layer.spikes),
            ):
                found = first_nonfinite(tensor)
                if found is not None:
                    where, value = found
                    raise ValueError(
                        f"the state of {name} holds {value} in its {field} at {tuple(where)}; "
                        "a stream's state must be finite: start again from "
                        "initial_state(batch_size)"
                    )

    def _advance(self, x: Tensor, state: StreamState) -> tuple[Tensor, list[Tensor]]:
        weight = self.readout.weight
        if x.device != weight.device:
            raise ValueError(
                f"the input is on {x.device}, the stream on {weight.device}; move one with "
                ".to(device)"
            )
        if x.dtype != weight.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the network's "
                f"{weight.dtype}; convert one with .to(dtype)"
            )
        # before any layer runs: a NaN would poison the membranes, silencing the stream for
        # good without a word
        found = first_nonfinite(x)
        if found is not None:
            (t, b, c), value = found
            raise ValueError(
                f"the input at step {state.t + t} of the stream (batch item {b}, channel {c}) is "
                f"{value}, not finite; the state is unchanged: check the data (torch.isfinite)"
            )
        steps, batch = x.shape[:2]
        if not steps:  # nothing arrived: nothing changes
            return x.new_zeros(0, batch, self.output_size), [
                x.new_zeros(0, batch, layer.size) for layer in self.layers
            ]
        stack = self._stack if x.device.type == "cpu" else None
        if stack is None:
            stack = self._compiled_stack(x.device)
        if stack is not None:  # every layer and the readout: one compiled call
            *spikes, out = run_stack(stack, x, [*state.layers, state.readout])
        else:
            with torch.no_grad():
                spikes = []
                for index, layer in enumerate(self.layers):
                    x, state.layers[index] = layer.advance(x, state.layers[index])
                    spikes.append(x)
                out = self._readout(x, state)
        for index, layer_spikes in enumerate(spikes):
            state.spikes[index] = layer_spikes[-1]
        state.t += steps
        if self._checked is not None and self._checked[0] is state:  # its own new layer states
            self._checked = (*self._checked[:3], [*state.layers, state.readout])
        return out, spikes

    def _compiled_stack(self, device: torch.device) -> list[IntegerLayer] | None:
        """The compiled loops of every layer and the readout, when all of them have one."""
        if self._stack is None and device.type == "cpu" and native.load("ring") is not None:
            layers = [layer.compiled(device) for layer in self.layers]
            if all(layer is not None for layer in layers):
                neuron = self.readout_neuron
                integrator = (0.0, 1.0)  # no readout neuron: out = the readout current
                if neuron is not None:
                    gain = 1.0 / neuron.tau if neuron.decay_input else 1.0
                    integrator = (1.0 - 1.0 / neuron.tau, gain)
                readout = IntegerLayer(self.output_size, self.readout, integrator=integrator)
                self._stack = [*layers, readout]
        return self._stack if device.type == "cpu" else None

    def _readout(self, x: Tensor, state: StreamState) -> Tensor:
        """The readout's output ``(T, B, K)`` for the last layer's spikes ``x``, in PyTorch ops."""
        out, _ = self.readout.run(x, state.readout.inputs)
        neuron = self.readout_neuron
        if neuron is not None:  # the state is this stream's (checked): no module checks again
            out = leaky_integrator_run(out, state.readout.neuron[0], neuron.tau, neuron.decay_input)
            # a copy: the caller owns the returned outputs, and may edit them in place
            state.readout = state.readout._replace(neuron=(out[-1].clone(),))
        return out

    @torch.no_grad()
    def run(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Stream a whole time-major sequence ``(T, B, C)`` from a fresh state; returns the
        outputs ``(T, B, K)`` and each layer's spikes ``(T, B, N_l)`` (one unbatched sequence
        ``(T, C)``: ``(T, K)`` and ``(T, N_l)``)."""
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"expected a time-major sequence (T, B, {self.input_size}) with T > 0 and "
                f"B > 0, got {tuple(x.shape)}"
            )
        out, spikes = self.advance(x, self.initial_state(x.shape[1]))
        if unbatched:
            return out.squeeze(1), [s.squeeze(1) for s in spikes]
        return out, spikes


def _state_name(index: int, count: int) -> str:
    """How messages name entry ``index`` of a state's ``count`` layer states (the readout's
    last)."""
    return f"layer {index}" if index < count - 1 else "the readout"


def check_deployable(net: nn.Module) -> None:
    """A ValueError naming the first value of ``net`` that a chip would run differently from
    the trained network: a parameter or statistic holding NaN or Inf, a recurrent delay below 0
    (training reads it as it is, the integer-delay mode as 0). (Delays beyond the network's
    ``max_delay`` are the hardware report's to show, and :func:`~delrec.deploy.to_nir`'s to
    refuse.)"""
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if tensor.is_floating_point() and not bool(tensor.detach().isfinite().all()):
            raise ValueError(
                f"{name} holds NaN or Inf: the network cannot be deployed; find where it came "
                "from (torch.isfinite), e.g. a diverged training run (restore a checkpoint)"
            )
    for name, module in net.named_modules():
        delay = module.delay.detach() if isinstance(module, DelRec) else None
        if delay is not None and bool((delay < 0).any()):
            raise ValueError(
                f"{name}.delay holds delays below 0 ({delay.min():.4g} steps): training "
                "reads them as they are, a chip as 0; clamp them with "
                "delrec.layers.clamp_delays(net), as training does after every step"
            )


def _synapse_tensors(module: nn.Module, where: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(weight (O, I), integer lags (O, I), bias)`` of a Linear or FeedforwardDelay in eval."""
    if isinstance(module, nn.Linear):
        weight = module.weight.detach()
        return (
            weight,
            torch.zeros(weight.shape, dtype=torch.long, device=weight.device),
            module.bias,
        )
    if isinstance(module, FeedforwardDelay):
        position = module.position.detach().round()
        inside = (position >= 0) & (position <= module.kernel_size - 1)
        weight = torch.where(inside, module.weight.detach(), torch.zeros_like(module.weight))
        return weight, torch.where(inside, position, 0).long(), module.bias
    raise TypeError(
        f"{where}: synapses of type {type(module).__name__} are not supported; "
        "use nn.Linear or delrec.layers.FeedforwardDelay"
    )


def _fold_batch_norm(
    norm: nn.Module, weight: Tensor, bias: Tensor | None, where: str
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode ``BatchNorm1d`` into the affine map ``(W, b)`` before it."""
    if not isinstance(norm, nn.BatchNorm1d):
        raise TypeError(
            f"{where}: normalisation {type(norm).__name__} is not supported "
            "(only BatchNorm1d, which is folded into the weights)"
        )
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"{where}: BatchNorm1d has no running statistics "
            "(track_running_stats=False), so it cannot be folded into fixed weights"
        )
    dtype = weight.dtype
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        scale, shift = (
            scale * norm.weight.double(),
            shift * norm.weight.double() + norm.bias.double(),
        )
    folded_bias = shift if bias is None else bias.double() * scale + shift
    return (weight.double() * scale[:, None]).to(dtype), folded_bias.to(dtype)

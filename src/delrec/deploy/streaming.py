"""Integer-delay streaming inference: a trained network run one time step at a time.

A :class:`StreamingNetwork` is what a neuromorphic chip runs: every delay is an integer
number of steps, every synaptic projection reads its input from a ring buffer of the last
``max_lag + 1`` input vectors (:class:`delrec.engine.ring.DelayedSynapses`, which the layer's
integer-delay inference runs on too), batch norm is folded into the weights and dropout is gone.
It reproduces ``net.eval()`` on the whole sequence (docs/design.md#integer-delay-mode) spike
for spike, and it is also what :func:`delrec.deploy.import_nir` builds from a NIR file.

Conventions (time in steps):

* a feedforward projection computes ``c_i[t] = Σ_j W_ij x_j[t - lag_ij] + b_i``;
* a recurrent projection (DelRec) computes ``r_i[t] = Σ_j W_ij s_j[t - 1 - lag_ij]``: the
  loop itself takes one step and ``lag = round(d)`` more (axonal delays: ``lag_ij = d_j``);
* histories before ``t = 0`` are zero; neurons start from their ``initial_state``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from delrec.delays import integer_delays
from delrec.engine.ring import DelayedSynapses
from delrec.layers import DelRec, FeedforwardDelay
from delrec.neurons import LeakyIntegrator, as_neuron, leaky_integrator_step


class StreamingLayer(nn.Module):
    """One hidden layer: ``c = synapses(x)``, ``u = c + recurrent(s)``, ``s = neuron.step(u)``.

    ``synapses`` and ``recurrent`` are :class:`DelayedSynapses` (``recurrent`` is ``None`` for a
    feedforward layer); ``neuron`` follows :class:`delrec.neurons.Neuron`.
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
        self.synapses, self.neuron, self.recurrent = synapses, as_neuron(neuron), recurrent

    @property
    def size(self) -> int:
        return self.synapses.out_features


@dataclass
class StreamState:
    """Everything a stream remembers between steps (tensors are updated in place).

    ``t``: steps consumed so far. ``input_buffers[l]``: ring of layer ``l``'s input
    (:meth:`DelayedSynapses.new_buffer`); ``recurrent_buffers[l]``: ring of its own spikes or
    ``None``; ``neuron_states[l]``: the neuron state tuple; ``readout_buffer``: ring of the
    readout's input; ``readout_membrane``: ``(B, K)`` or ``None``; ``spikes[l]``: the latest
    spikes ``(B, N_l)``.
    """

    t: int
    input_buffers: list[Tensor]
    recurrent_buffers: list[Tensor | None]
    neuron_states: list[tuple[Tensor, ...]]
    readout_buffer: Tensor
    readout_membrane: Tensor | None
    spikes: list[Tensor]

    @property
    def batch_size(self) -> int:
        return self.readout_buffer.shape[0]


class StreamingNetwork(nn.Module):
    """A spiking network run step by step with integer delays (see the module docstring).

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

    @property
    def input_size(self) -> int:
        return (self.layers[0].synapses if len(self.layers) else self.readout).in_features

    @property
    def output_size(self) -> int:
        return self.readout.out_features

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        like = [self.readout.weight.new_zeros(batch_size, layer.size) for layer in self.layers]
        return StreamState(
            t=0,
            input_buffers=[layer.synapses.new_buffer(batch_size) for layer in self.layers],
            recurrent_buffers=[
                None if layer.recurrent is None else layer.recurrent.new_buffer(batch_size)
                for layer in self.layers
            ],
            neuron_states=[
                tuple(layer.neuron.initial_state(z)) for layer, z in zip(self.layers, like)
            ],
            readout_buffer=self.readout.new_buffer(batch_size),
            readout_membrane=None
            if self.readout_neuron is None
            else self.readout.weight.new_zeros(batch_size, self.output_size),
            spikes=like,
        )

    @torch.no_grad()
    def step(self, x_t: Tensor, state: StreamState) -> Tensor:
        """Consume one input frame ``(B, C)`` (or ``(C,)`` for one stream) and return the
        output of this step, ``(B, K)`` (or ``(K,)``). ``state`` is advanced in place."""
        unbatched = x_t.dim() == 1
        x = x_t.unsqueeze(0) if unbatched else x_t
        if x.dim() != 2 or x.shape != (state.batch_size, self.input_size):
            raise ValueError(
                f"expected one frame of shape ({state.batch_size}, {self.input_size})"
                + (f" or ({self.input_size},)" if state.batch_size == 1 else "")
                + f", got {tuple(x_t.shape)}; make the state with "
                "initial_state(batch_size)"
            )
        if x.dtype != self.readout.weight.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the network's "
                f"{self.readout.weight.dtype}; convert one with .to(dtype)"
            )
        t = state.t
        for index, layer in enumerate(self.layers):
            layer.synapses.write(state.input_buffers[index], t, x)
            current = layer.synapses.read(state.input_buffers[index], t)
            if layer.recurrent is not None:
                current = current + layer.recurrent.read(state.recurrent_buffers[index], t - 1)
            x, state.neuron_states[index] = layer.neuron.step(current, state.neuron_states[index])
            if layer.recurrent is not None:
                layer.recurrent.write(state.recurrent_buffers[index], t, x)
            state.spikes[index] = x
        self.readout.write(state.readout_buffer, t, x)
        out = self.readout.read(state.readout_buffer, t)
        if self.readout_neuron is not None:
            neuron = self.readout_neuron
            out = leaky_integrator_step(out, state.readout_membrane, neuron.tau, neuron.decay_input)
            state.readout_membrane = out
        state.t = t + 1
        return out.squeeze(0) if unbatched else out

    @torch.no_grad()
    def run(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Stream a whole time-major sequence ``(T, B, C)`` (or ``(T, C)``) from a fresh state;
        returns the outputs ``(T, B, K)`` and each layer's spikes ``(T, B, N_l)``."""
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[0] == 0:
            raise ValueError(
                f"expected a time-major sequence (T, B, {self.input_size}) with T > 0, "
                f"got {tuple(x.shape)}"
            )
        state = self.initial_state(x.shape[1])
        outputs, spikes = [], [[] for _ in self.layers]
        for x_t in x:
            outputs.append(self.step(x_t, state))
            for per_layer, s in zip(spikes, state.spikes):
                per_layer.append(s)
        out, spikes = torch.stack(outputs), [torch.stack(s) for s in spikes]
        if unbatched:
            return out.squeeze(1), [s.squeeze(1) for s in spikes]
        return out, spikes


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

"""Network builders: the paper's architectures and their ablation family
(docs/design.md#the-papers-networks).

One config object, :class:`NetworkConfig`, describes a network; :func:`build_network` turns
it into a :class:`SpikingNetwork`; :data:`VARIANTS` defines the model variants of the
ablation family; :func:`preset_network` gives the network of a task's recipe
(:mod:`delrec.recipes`) as one of them. Every network maps a time-major input ``(T, B, C)`` to
a readout sequence ``(T, B, K)``; :func:`readout_reduce` turns that sequence into the logits
or prediction.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from delrec import cpu
from delrec.data import dataset_info
from delrec.delays import MAX_DELAY, check_max_delay
from delrec.engine import DELAY_TYPES, fused
from delrec.engine.dropout import check_probability
from delrec.engine.lif import is_builtin_lif
from delrec.layers import DelRec, DelRecState, FeedforwardDelay, run_chunk
from delrec.layers.dropout import Dropout
from delrec.layers.feedforward import weight_bound
from delrec.layers.precision import own_precision
from delrec.layers.sizes import check_size, is_whole_number
from delrec.neurons import (
    LIF,
    SURROGATES,
    LeakyIntegrator,
    check_state,
    check_state_finite,
    first_nonfinite,
    make_surrogate,
)
from delrec.recipes import RECIPES

READOUTS = ("lif", "sum", "ema")


@dataclass(frozen=True)
class Variant:
    """A model of the ablation family: what its recurrent positions (the hidden layers named by
    ``NetworkConfig.recurrent_layers``) hold and what it learns.

    ``recurrence``: ``None`` (LIF neurons without recurrent connections), ``"vanilla"``
    (recurrent weights, no delays), ``"fixed"`` (integer delays drawn at initialisation and
    frozen) or ``"learned"`` (delays trained through the σ-spread kernel). ``delay_type``: the
    recurrent delay type it imposes (``None``: the config's ``delay_type``).
    ``feedforward_delays``: the synapses into those positions are learned feedforward delays
    (:class:`~delrec.layers.FeedforwardDelay`). ``label``: its name in tables and figures.
    ``grad_clip``: its training default for ``optim.grad_clip``. ``ablation``: one of the four
    models of the paper's ablation (the default models of ``delrec sweep params``).
    """

    label: str
    recurrence: str | None
    delay_type: str | None = None
    feedforward_delays: bool = False
    grad_clip: float | None = None
    ablation: bool = False

    @property
    def recurrent(self) -> bool:
        return self.recurrence is not None

    @property
    def recurrent_delays(self) -> bool:
        return self.recurrence in ("fixed", "learned")

    @property
    def learns_recurrent_delays(self) -> bool:
        return self.recurrence == "learned"

    @property
    def learns_delays(self) -> bool:
        """Learned recurrent delays or feedforward positions: delays a chip runs rounded."""
        return self.learns_recurrent_delays or self.feedforward_delays


VARIANTS = {
    "snn": Variant("SNN", None, ablation=True),
    "rsnn": Variant("RSNN", "vanilla", grad_clip=1.0, ablation=True),
    "fixed": Variant("Fixed rec. delays", "fixed", ablation=True),
    "delrec": Variant("DelRec", "learned", ablation=True),
    "delrec-shared": Variant("DelRec (one shared delay)", "learned", delay_type="shared"),
    "ffdelay": Variant("Ff. delays", None, feedforward_delays=True),
    "ff+rec": Variant("Ff. delays + DelRec", "learned", feedforward_delays=True),
}
MODELS = tuple(VARIANTS)


@dataclass
class NeuronConfig:
    """LIF settings (docs/design.md#lif-neuron).

    ``reset``: ``"hard"`` (to ``v_reset``) or ``"soft"``."""

    tau: float = 2.0
    v_threshold: float = 1.0
    reset: str = "soft"
    v_reset: float = 0.0
    detach_reset: bool = False
    decay_input: bool = False
    surrogate: str = "triangle"
    surrogate_scale: float = 1.0  # γ for "triangle", α for "atan"

    def build(self) -> LIF:
        if self.reset not in ("hard", "soft"):
            raise ValueError(f"neuron reset must be 'hard' or 'soft', got {self.reset!r}")
        if not isinstance(self.surrogate, str):
            raise TypeError(
                f"neuron surrogate must be one of {sorted(SURROGATES)}, got {self.surrogate!r}"
            )
        for name in ("detach_reset", "decay_input"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"neuron {name} must be True or False, got {getattr(self, name)!r}")
        scale_name = {"triangle": "gamma", "atan": "alpha"}.get(self.surrogate.lower(), "gamma")
        try:
            surrogate = make_surrogate(self.surrogate, **{scale_name: self.surrogate_scale})
        except (TypeError, ValueError) as error:
            if self.surrogate.lower() not in SURROGATES:
                raise
            raise type(error)(f"neuron surrogate_scale: {error}") from None
        return LIF(
            self.tau,
            self.v_threshold,
            None if self.reset == "soft" else self.v_reset,
            self.detach_reset,
            self.decay_input,
            surrogate,
        )


@dataclass
class NetworkConfig:
    """Everything that defines a network. Sizes in neurons, delays and windows in time steps.

    ``recurrent_layers``: indices of the hidden layers that the DelRec model makes recurrent
    (``None``: all); the ablations change exactly those layers. ``block``:
    ``"bn"`` = Linear → BatchNorm → neuron → dropout (SHD), ``"dropout"`` = Linear → dropout →
    neuron (SSC, PS-MNIST, Mackey-Glass). ``readout``: ``"lif"`` (LIF with infinite threshold,
    per-step softmax summed), ``"sum"`` (Linear summed over time), ``"ema"`` (exponential
    moving average of the Linear output, last value = prediction).
    ``max_delay``: the longest delay ``d`` any layer may have, integer steps, or ``None`` (only
    ``MAX_DELAY``): a chip's limit (docs/deployment.md#chips-delay-limits). Recurrent delays
    and feedforward positions are kept in ``[0, max_delay]`` from initialisation (draws above
    it are clamped, with a :class:`~delrec.delays.DelayLimitWarning`) through every optimizer
    step (:func:`delrec.layers.clamp_delays`). ``feedforward_init``: the initial weights of
    every feedforward synapse, Linear and feedforward-delay layers and the readout alike
    (:func:`delrec.layers.feedforward.weight_bound`).
    """

    input_size: int
    hidden_sizes: tuple[int, ...]
    output_size: int
    model: str = "delrec"
    recurrent_layers: tuple[int, ...] | None = None
    block: str = "dropout"
    bias: bool = True
    dropout: float = 0.1
    recurrent_dropout: float = 0.0
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    delay_type: str = "axonal"
    delay_init: str = "half_normal:12"
    max_delay: int | None = None
    learn_spread: bool = False
    ff_delay_window: int = 26
    feedforward_init: str = "uniform-sqrt6"
    readout: str = "sum"
    readout_tau: float = 2.0
    readout_bias: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse a bad setting with a ValueError (or TypeError) naming it; normalise the
        sequences to tuples. Runs at construction and again in :func:`build_network` (a
        dataclass's fields may be changed after construction)."""
        for name in ("bias", "learn_spread", "readout_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("hidden_sizes", "recurrent_layers"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not (
                value is None or isinstance(value, Iterable)
            ):
                raise TypeError(f"{name} must be a list of whole numbers, got {value!r}")
        self.hidden_sizes = tuple(self.hidden_sizes)
        if isinstance(self.neuron, dict):
            self.neuron = NeuronConfig(**self.neuron)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODELS}")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {READOUTS}")
        if self.block not in ("bn", "dropout"):
            raise ValueError(f"block must be 'bn' or 'dropout', got {self.block!r}")
        if self.delay_type not in DELAY_TYPES:
            raise ValueError(f"delay_type must be one of {DELAY_TYPES}, got {self.delay_type!r}")
        if not (isinstance(self.readout_tau, numbers.Real) and 1 <= self.readout_tau < math.inf):
            raise ValueError(
                f"readout_tau must be a number of time steps >= 1, got {self.readout_tau!r}"
            )
        weight_bound(self.feedforward_init, 1)  # a ValueError naming the choices
        window = self.ff_delay_window
        if not (is_whole_number(window) and 1 <= window <= MAX_DELAY + 1):
            raise ValueError(
                f"ff_delay_window must be between 1 and {MAX_DELAY + 1:g} steps (delays of 0 … "
                f"MAX_DELAY = {MAX_DELAY:g} steps), got {self.ff_delay_window!r}"
            )
        check_max_delay(self.max_delay, "max_delay")
        if not self.hidden_sizes:
            raise ValueError("hidden_sizes must name at least one hidden layer, got ()")
        self.hidden_sizes = tuple(check_size(n, "each of hidden_sizes") for n in self.hidden_sizes)
        self.input_size = check_size(self.input_size, "input_size")
        self.output_size = check_size(self.output_size, "output_size")
        for name in ("dropout", "recurrent_dropout"):
            check_probability(getattr(self, name), name)
        if self.recurrent_layers is not None:
            self.recurrent_layers = tuple(self.recurrent_layers)
            bad = [
                i
                for i in self.recurrent_layers
                if not is_whole_number(i) or not 0 <= i < len(self.hidden_sizes)
            ]
            if bad:
                raise ValueError(
                    f"recurrent_layers {bad}: each must be the index of a hidden layer, a whole "
                    f"number from 0 to {len(self.hidden_sizes) - 1} "
                    f"({len(self.hidden_sizes)} hidden layers)"
                )
            if len(set(self.recurrent_layers)) != len(self.recurrent_layers):
                raise ValueError(
                    f"recurrent_layers {list(self.recurrent_layers)} names a layer twice"
                )
            variant = VARIANTS[self.model]
            if not self.recurrent_layers and (variant.recurrent or variant.feedforward_delays):
                raise ValueError(
                    f"recurrent_layers [] leaves the {self.model} model no layer for its "
                    f"{'recurrence' if variant.recurrent else 'feedforward delays'}: it would "
                    "train the snn model under another name; name at least one hidden layer, "
                    "or use the snn model"
                )

    def is_recurrent_position(self, index: int) -> bool:
        return self.recurrent_layers is None or index in self.recurrent_layers

    def weight_count(self) -> int:
        """The number of scalars in the network's weights, delays and positions (the synaptic
        matrices; biases and per-neuron parameters, a few per neuron, left out), from the
        sizes alone: what a too-large network costs before any is built."""
        variant, count, fan_in = VARIANTS[self.model], 0, self.input_size
        for index, size in enumerate(self.hidden_sizes):
            position = self.is_recurrent_position(index)
            count += fan_in * size * (2 if position and variant.feedforward_delays else 1)
            if position and variant.recurrent:
                synaptic = variant.recurrence != "vanilla" and (
                    (variant.delay_type or self.delay_type) == "synaptic"
                )
                count += size * size * (2 if synaptic else 1)
            fan_in = size
        return count + fan_in * self.output_size


class BlockState(NamedTuple):
    """A hidden block's state between chunks of a sequence: its synapses' (a
    :class:`FeedforwardDelay`'s last ``K-1`` inputs ``(K-1, B, I)``, None for ``nn.Linear``) and
    its neurons' (a :class:`~delrec.layers.DelRecState`, or the LIF's ``(v,)``, ``(B, N)``)."""

    synapses: Tensor | None
    neurons: DelRecState | tuple[Tensor, ...]


class NetworkState(NamedTuple):
    """A :class:`SpikingNetwork`'s state between chunks of a sequence: one :class:`BlockState`
    per hidden block, and the readout neuron's ``(v,)`` ``(B, K)`` (None without one)."""

    blocks: tuple[BlockState, ...]
    readout: tuple[Tensor, ...] | None


def hooked(modules) -> bool:
    """Whether a hook waits on one of ``modules`` or their sub-modules: a forward or backward
    hook or pre-hook of their own (``torch.nn.utils.prune``'s, a recorder's, an ablation's) or
    registered for every module. The fused loops call no module but the DelRec layers (whose
    hooks run either way, a distributed run's recurrent-mask hook among them), so a block with
    one elsewhere runs its modules instead (the reference path, the same numbers)."""
    from torch.nn.modules import module as base

    if base._global_forward_hooks or base._global_forward_pre_hooks:
        return True
    if base._global_backward_hooks or base._global_backward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for module in modules
        for m in module.modules()
        if not isinstance(m, DelRec)
    )


class HiddenBlock(nn.Module):
    """One hidden layer: synapses (Linear or FeedforwardDelay) → [BatchNorm] → neurons → dropout
    (dropout before the neurons with ``dropout_first``, the SSC/PS-MNIST blocks).

    ``(T, B, I)`` → spikes ``(T, B, O)``. ``neurons`` is a DelRec layer or a plain LIF. It runs
    a chunk of a sequence from a :class:`BlockState` like the layers do (:meth:`forward`).
    ``engine`` (see :func:`set_feedforward_engine`): ``"fused"`` runs ``Linear`` synapses
    (:func:`delrec.engine.fused.linear`: over the non-zero spikes), BatchNorm, a plain LIF
    layer with its dropout, and a lone dropout as the fused loops of
    :mod:`delrec.engine.fused` where they are available (the C++ kernels on the CPU, the Triton
    kernels on CUDA; a plain LIF layer run from a state runs its module), and hands a DelRec
    layer its dropout (``input_dropout=`` or ``output_dropout=``: in the engine's loops where
    it can); ``"reference"`` runs the modules step by step under autograd. Same numbers either
    way. A block whose modules carry hooks (:func:`hooked`) runs its modules, so the hooks run.
    """

    def __init__(
        self,
        synapses: nn.Module,
        neurons: nn.Module,
        norm: nn.BatchNorm1d | None,
        dropout: float,
        dropout_first: bool,
    ):
        super().__init__()
        self.synapses, self.norm, self.neurons = synapses, norm, neurons
        self.dropout = Dropout(dropout)
        self.dropout_first = dropout_first
        self.engine = "fused"

    def forward(
        self, x: Tensor, state: BlockState | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, BlockState]:
        """``(T, B, I)`` → spikes ``(T, B, O)``, from ``state`` (default: a fresh start);
        ``return_state=True`` also returns the :class:`BlockState` after the last step. In
        training, BatchNorm normalises each chunk by its own statistics."""
        stateful = state is not None or return_state
        synapse_state, neuron_state = state if state is not None else (None, None)
        use_fused = (
            self.engine == "fused"
            and fused.kernels_for(x.device) is not None
            and not hooked(self.children())
        )
        linear_fused = use_fused and type(self.synapses) is nn.Linear  # stateless synapses
        norm_fused = use_fused and fused.fusable_norm(self.norm)
        if linear_fused:  # spike products; a normalisation removes the bias: it folds it in
            bias = None if norm_fused else self.synapses.bias
            current = fused.linear(x, self.synapses.weight, bias)
        else:
            current, synapse_state = run_chunk(self.synapses, x, synapse_state, stateful)
        if norm_fused:  # statistics over all T·B frames
            shift = self.synapses.bias if linear_fused else None
            current = fused.batch_norm(current, self.norm, shift)
        elif self.norm is not None:
            current = self.norm(current.flatten(0, 1)).view_as(current)
        if use_fused and is_builtin_lif(self.neurons) and not stateful:  # layer + dropout: one loop
            mask = self.dropout.draw()
            masks = (mask, None) if self.dropout_first else (None, mask)
            return fused.lif_layer(current, self.neurons.p, *masks)
        if use_fused and isinstance(self.neurons, DelRec) and not stateful:
            # the recurrent layer drops its input current or its spikes itself (in its loops
            # where it can); the spikes' mask is drawn after the layer's own recurrent mask, as
            # the modules draw them
            if self.dropout_first:
                return self.neurons(current, input_dropout=self.dropout.draw())
            return self.neurons(current, output_dropout=self.dropout.draw)
        if self.dropout_first:
            spikes, neuron_state = run_chunk(
                self.neurons, self.dropout(current), neuron_state, stateful
            )
        else:
            spikes, neuron_state = run_chunk(self.neurons, current, neuron_state, stateful)
            spikes = self.dropout(spikes)
        if return_state:
            return spikes, BlockState(synapse_state, neuron_state)
        return spikes


class SpikingNetwork(nn.Module):
    """Stack of hidden blocks and a readout; ``(T, B, C)`` → readout sequence ``(T, B, K)``.

    A sequence can run in chunks: ``out, state = net(x[:100], return_state=True)``, then
    ``net(x[100:], state)``, gives the output of one pass: in eval mode the same spikes, and
    the same outputs to the bit in float64 (in float32 up to the order in which the BLAS sums
    a product of another length); in training BatchNorm normalises each chunk by its own
    statistics. The state is a :class:`NetworkState`.
    """

    def __init__(
        self,
        config: NetworkConfig,
        blocks: list[HiddenBlock],
        readout: nn.Module,
        readout_neuron: nn.Module | None,
    ):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(blocks)
        self.readout = readout
        self.readout_neuron = readout_neuron
        self.engine = "fused"  # of the readout neuron; see set_feedforward_engine

    @torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
    @own_precision  # under autocast: in the network's dtype (the fused loops run no other)
    def forward_with_spikes(
        self, x: Tensor, state: NetworkState | None = None, *, return_state: bool = False
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], NetworkState]:
        """Readout sequence ``(T, B, K)`` and the spikes ``(T, B, N_l)`` of every hidden layer,
        from ``state`` (default: a fresh start); ``return_state=True`` also returns the
        :class:`NetworkState` after the last step (no gradient)."""
        if x.dim() != 3 or x.shape[-1] != self.config.input_size:
            raise ValueError(
                f"network expects time-major input (T, B, {self.config.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("input sequence is empty (T = 0)")
        parameter = self.readout.weight
        if parameter.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"a delrec network runs in float32 or float64 (its fused loops and dropout "
                f"masks), not {parameter.dtype}; convert it with .float(), or keep it float32 "
                "under torch.autocast, which runs it in float32"
            )
        if x.dtype != parameter.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the network's {parameter.dtype}; "
                "convert one with .to(dtype)"
            )
        # before any layer runs: a NaN would reach BatchNorm's running statistics (spoiling
        # every later evaluation) or silence a layer without a word (one device sync)
        found = first_nonfinite(x)
        if found is not None:
            (t, b, c), value = found
            raise ValueError(
                f"the network's input is not finite: {value} at step {t}, batch item {b}, "
                f"channel {c}; check the data (torch.isfinite)"
            )
        if torch.is_grad_enabled() and x.device.type == "cpu":
            cpu.warn_if_subnormals_kept()
        stateful = state is not None or return_state
        if state is not None and not isinstance(state, NetworkState):
            raise TypeError(
                f"state must be the NetworkState this network returned (net(x, "
                f"return_state=True)), got {type(state).__name__}"
            )
        if state is not None and len(state.blocks) != len(self.blocks):
            raise ValueError(
                f"state has {len(state.blocks)} blocks, the network {len(self.blocks)}; pass the "
                "NetworkState this network returned"
            )
        spikes, block_states = [], []
        for index, block in enumerate(self.blocks):
            if stateful:
                x, block_state = block(x, state.blocks[index] if state else None, return_state=True)
                block_states.append(block_state)
            else:
                x = block(x)
            spikes.append(x)
        out = self.readout(x)
        neuron, readout_state = self.readout_neuron, None
        if neuron is None and state is not None and state.readout is not None:
            raise ValueError(
                f"this network's {self.config.readout!r} readout keeps no state between chunks, "
                "but the state holds a readout state; pass the NetworkState this network "
                "returned (its readout is None)"
            )
        if neuron is not None:
            start = state.readout if state is not None else None
            if start is not None:
                check_state(start, (out[0],), "readout")
                check_state_finite(start, "readout")
            runs_fused = self.engine == "fused" and fused.kernels_for(out.device) is not None
            if runs_fused and not hooked([neuron]):
                initial = None if start is None else start[0]
                out = fused.integrate(out, neuron.tau, neuron.decay_input, initial)
                readout_state = (out[-1].detach(),) if stateful else None
            else:
                out, readout_state = run_chunk(neuron, out, start, stateful)
        if return_state:
            return out, spikes, NetworkState(tuple(block_states), readout_state)
        return out, spikes

    @torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
    def forward(
        self, x: Tensor, state: NetworkState | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, NetworkState]:
        """Readout sequence ``(T, B, K)``; with ``state``/``return_state`` as in
        :meth:`forward_with_spikes`."""
        result = self.forward_with_spikes(x, state, return_state=return_state)
        return (result[0], result[2]) if return_state else result[0]


def set_feedforward_engine(network: nn.Module, engine: str) -> None:
    """Run the network around the delays of ``network`` on ``engine``: ``"fused"`` (the default:
    plain LIF layers, the leaky-integrator readout, dropout and BatchNorm as the compiled loops
    of :mod:`delrec.engine.fused`, where they are built) or ``"reference"`` (the modules'
    step-by-step autograd). The recurrent layers keep their own ``engine`` option."""
    if engine not in fused.NETWORK_ENGINES:
        raise ValueError(
            f"unknown feedforward engine {engine!r}; choose one of {fused.NETWORK_ENGINES}"
        )
    for module in network.modules():
        if isinstance(module, (HiddenBlock, SpikingNetwork, Dropout)):
            module.engine = engine


def readout_reduce(output: Tensor, readout: str, lengths: Tensor | None = None) -> Tensor:
    """Readout sequence ``(T, B, K)`` → logits or prediction ``(B, K)``.

    ``"lif"``: Σ_t softmax(V[t]) (a probability mass summed over time; take its log for the
    cross-entropy); ``"sum"``: Σ_t output[t]; ``"ema"``: the last value. ``lengths`` ``(B,)``:
    each sample's true number of steps (integers in ``[1, T]``); the padding after it does not
    count, so a sample gets the same answer whatever the batch it is padded in. ``None``: every
    step counts.
    """
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
    steps = output.shape[0]
    if lengths is not None:
        lengths = check_lengths(lengths, steps, output.shape[1])
        if bool((lengths == steps).all()):  # no padding (checked where the lengths live)
            lengths = None
        else:
            lengths = lengths.to(output.device)
    if readout == "ema":
        if lengths is None:
            return output[-1]
        return output[lengths - 1, torch.arange(output.shape[1], device=output.device)]
    terms = output.softmax(-1) if readout == "lif" else output
    if lengths is not None:  # the padding's terms count zero
        valid = torch.arange(steps, device=output.device)[:, None] < lengths[None, :]
        terms = terms * valid.unsqueeze(-1).to(terms.dtype)
    return terms.sum(0)


def check_lengths(lengths: Tensor, steps: int, batch: int) -> Tensor:
    """``lengths`` as int64, or a ValueError unless it holds ``batch`` integer lengths in
    ``[1, steps]``."""
    if not torch.is_tensor(lengths):
        raise TypeError(
            f"lengths must be a tensor of integers (steps per sample), got "
            f"{type(lengths).__name__}; wrap it with torch.as_tensor"
        )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integers (steps per sample), got {lengths.dtype}")
    lengths = lengths.long()  # every integer type (unsigned ones compare only as int64)
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)}; it needs one length per sample of the "
            f"batch: ({batch},)"
        )
    if batch and not bool(((lengths >= 1) & (lengths <= steps)).all()):
        raise ValueError(
            f"lengths must lie in [1, {steps}] (the sequence's steps), got "
            f"{lengths.min().item()}…{lengths.max().item()}"
        )
    return lengths


def _linear(
    cfg: NetworkConfig, fan_in: int, fan_out: int, bias: bool, generator: torch.Generator | None
) -> nn.Linear:
    """``nn.Linear`` with the weights of ``cfg.feedforward_init`` (:func:`weight_bound`) and
    biases ``U(±1/sqrt(fan_in))``."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    bound = weight_bound(cfg.feedforward_init, fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        if bias:
            layer.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
    return layer


def _neurons(
    cfg: NetworkConfig, size: int, recurrent_position: bool, generator: torch.Generator | None
) -> nn.Module:
    neuron = cfg.neuron.build()
    variant = VARIANTS[cfg.model]
    if not recurrent_position or not variant.recurrent:
        return neuron
    common = dict(
        recurrent_dropout=cfg.recurrent_dropout, generator=generator, max_delay=cfg.max_delay
    )
    if variant.recurrence == "vanilla":
        return DelRec.vanilla(size, neuron, **common)
    delay_type = variant.delay_type or cfg.delay_type
    if variant.recurrence == "fixed":
        return DelRec.fixed(
            size, neuron, delay_init=cfg.delay_init, delay_type=delay_type, **common
        )
    return DelRec(
        size,
        neuron,
        delay_type=delay_type,
        delay_init=cfg.delay_init,
        learn_spread=cfg.learn_spread,
        **common,
    )


def build_network(cfg: NetworkConfig, seed: int | None = None) -> SpikingNetwork:
    """Build the network ``cfg`` describes; ``seed`` makes the initialisation reproducible."""
    if not isinstance(cfg, NetworkConfig):
        raise TypeError(f"build_network takes a NetworkConfig, got {type(cfg).__name__}")
    cfg.check()  # its fields may have changed since it was made
    if seed is not None and not is_whole_number(seed):
        raise TypeError(f"seed must be a whole number or None, got {seed!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    blocks, fan_in = [], cfg.input_size
    for index, size in enumerate(cfg.hidden_sizes):
        recurrent_position = cfg.is_recurrent_position(index)
        if recurrent_position and VARIANTS[cfg.model].feedforward_delays:
            synapses = FeedforwardDelay(
                fan_in,
                size,
                cfg.ff_delay_window,
                cfg.bias,
                generator,
                max_delay=cfg.max_delay,
                init=cfg.feedforward_init,
            )
        else:
            synapses = _linear(cfg, fan_in, size, cfg.bias, generator)
        norm = nn.BatchNorm1d(size) if cfg.block == "bn" else None
        blocks.append(
            HiddenBlock(
                synapses,
                _neurons(cfg, size, recurrent_position, generator),
                norm,
                cfg.dropout,
                dropout_first=cfg.block == "dropout",
            )
        )
        fan_in = size
    readout = _linear(cfg, fan_in, cfg.output_size, cfg.readout_bias, generator)
    readout_neuron = {
        "lif": lambda: LeakyIntegrator(cfg.readout_tau, decay_input=cfg.neuron.decay_input),
        "ema": lambda: LeakyIntegrator(cfg.readout_tau, decay_input=True),
        "sum": lambda: None,
    }[cfg.readout]()
    return SpikingNetwork(cfg, blocks, readout, readout_neuron)


def preset_network(task: str, model: str = "delrec", **overrides) -> NetworkConfig:
    """The network of ``task``'s recipe (:data:`delrec.recipes.RECIPES`) as ``model`` (one of
    :data:`MODELS`), sized for the task's data set, with any field overridden by keyword."""
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[task]
    info = dataset_info(task, **recipe.get("data", {}))
    settings = {**copy.deepcopy(recipe["network"]), **overrides}
    return NetworkConfig(
        input_size=info.input_size, output_size=info.output_size, model=model, **settings
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (frozen delays of fixed/vanilla layers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The DelRec recurrent layer: spiking neurons with learnable recurrent transmission delays."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from delrec import cpu, user_warnings
from delrec import delays as delay_fns
from delrec.engine import (
    DELAY_TYPES,
    RecurrentState,
    check_engine,
    fused,
    kernel_reach,
    select,
)
from delrec.engine.dropout import MaskDraw, check_probability
from delrec.engine.lif import LIFMap
from delrec.engine.state import history_length, kept_history, next_history
from delrec.layers.precision import own_precision
from delrec.layers.sizes import check_size, check_tensor_shapes, is_whole_number
from delrec.neurons import LIF, as_neuron, check_state, refuse_nonfinite


class DelRecState(NamedTuple):
    """What a :class:`DelRec` layer carries from one chunk of a sequence to the next
    (docs/design.md#state-and-chunks).

    ``neuron``: the neuron's state after the last step, a tuple of ``(B, N)`` tensors (the
    built-in LIF: ``(v,)``). ``spikes``: ``(H, B, N)``, the spikes of the last ``H`` steps,
    oldest first; earlier spikes count as 0 (``H``: the longer of the previous state's
    history and the kernel's reach ``L - 1``, at most the steps seen:
    :func:`delrec.engine.state.kept_history`). ``mask``: the recurrent dropout mask ``(B, N)`` of
    the sequence (training with ``recurrent_dropout > 0``), or None. ``steps``: how many steps
    of the sequence the state has seen (``None``: not known, a state made by hand); a layer
    refuses a state whose history was cut shorter than its delays now reach.
    """

    neuron: tuple[Tensor, ...]
    spikes: Tensor
    mask: Tensor | None
    steps: int | None = None


class DelRec(nn.Module):
    r"""Recurrent spiking layer whose recurrent connections carry learnable delays
    (docs/design.md#the-recurrent-delay-layer).

    For a time-major input current ``c`` of shape ``(T, B, N)`` (or ``(T, N)`` unbatched) it
    returns the spikes ``s`` of the same shape, computed step by step from zero history (or
    from a :class:`DelRecState`, see :meth:`forward`)::

        r_i[t] = Σ_j W_ij Σ_k κ_j(k) s_j[t-k]      u[t] = c[t] + m ⊙ r[t]
        s[t], state = neuron.step(u[t], state)

    - ``size``: number of neurons ``N``.
    - ``neuron``: neuron model (default ``LIF()``): one of ours, a user-written module with
      ``initial_state``/``step`` (see :class:`delrec.neurons.Neuron`), or a SpikingJelly
      single-step node.
    - ``delay_type``: ``"axonal"`` (one delay per presynaptic neuron, shape ``N``),
      ``"synaptic"`` (one per synapse, ``N×N``) or ``"shared"`` (one for the layer).
    - ``delay_init``: initial delays in steps: a number, ``"uniform:A:B"``, ``"half_normal:S"``
      or a callable from :mod:`delrec.delays`; every delay must lie in
      ``[0, MAX_DELAY]`` (:data:`delrec.delays.MAX_DELAY`, 65 535 steps).
    - ``max_delay``: the longest delay ``d`` the layer may have, integer steps (a chip's limit,
      docs/deployment.md#chips-delay-limits), or ``None`` (``MAX_DELAY``): initial
      delays above it are clamped to it with a
      :class:`~delrec.delays.DelayLimitWarning`, and :meth:`clamp_delays_` keeps the
      delays in ``[0, max_delay]``.
    - ``learn_delays``: train the delays; False freezes them and runs them sharp (σ = 0,
      untouched by :func:`~delrec.layers.set_spread`). Freezing the parameter by hand
      instead (``delay.requires_grad_(False)``, a warm-up) keeps the spread σ.
    - ``round_init``: round the initial delays to integers (the fixed-random-delay baseline).
    - ``learn_spread``: learn a per-neuron spread logit ``p`` (``w = 1 + 2σ·sigmoid(p)``);
      otherwise every kernel has half-width ``w = 1 + σ``.
    - ``sigma``: current spread ``σ`` in steps, in ``[0, MAX_DELAY]`` (the training schedule
      updates it).
    - ``recurrent_dropout``: probability ``p`` of dropping a neuron's recurrent input for a whole
      sequence (mask drawn once per sequence, fixed over time; identity in eval).
    - ``engine``: ``"auto"`` (default: the fastest engine path that runs here, for the built-in
      :class:`~delrec.neurons.LIF` a hand-written forward/backward, and with integer
      delays and no gradient the ring-buffer inference path; ``"reference"`` for any
      other neuron), ``"fast"`` (the same, but the built-in LIF is required),
      ``"reference"`` (the paper's buffer algorithm, autograd; works with every neuron)
      or any other path name of :data:`delrec.engine.PATHS` (that path or an error).
      :func:`delrec.engine.select` makes the choice at each forward.

    In eval mode the layer runs with integer delays (``σ = 0``, ``d`` rounded), as a chip
    would, without touching its parameters; set ``integer_eval = False`` to evaluate with the
    spread kernel instead.
    """

    def __init__(
        self,
        size: int,
        neuron: nn.Module | None = None,
        *,
        delay_type: str = "axonal",
        delay_init="uniform:0:10",
        max_delay: int | None = None,
        learn_delays: bool = True,
        round_init: bool = False,
        learn_spread: bool = False,
        sigma: float = 0.0,
        recurrent_dropout: float = 0.0,
        engine: str = "auto",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if delay_type not in DELAY_TYPES:
            raise ValueError(f"delay_type must be one of {DELAY_TYPES}, got {delay_type!r}")
        for name, flag in (
            ("learn_delays", learn_delays),
            ("round_init", round_init),
            ("learn_spread", learn_spread),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"DelRec {name} must be True or False, got {flag!r}")
        self.size = size = check_size(size, "DelRec size (neurons)")
        self.neuron = as_neuron(neuron if neuron is not None else LIF())
        check_engine(engine, self.neuron)
        self.delay_type = delay_type
        self.learn_delays = learn_delays
        self.recurrent_dropout = recurrent_dropout
        self.engine = engine
        self.integer_eval = True
        self.max_delay = delay_fns.check_max_delay(max_delay)
        if not learn_delays and (delay_fns.check_sigma(sigma) or learn_spread):
            raise ValueError(
                f"DelRec({size}) with learn_delays=False runs its delays as they are (σ = 0), "
                f"so sigma={sigma} and learn_spread={learn_spread} would do nothing; leave them "
                "out, or learn the delays"
            )

        self.weight = nn.Parameter(torch.empty(size, size))
        nn.init.orthogonal_(self.weight, gain=1.0, generator=generator)
        delay_shape = {"axonal": (size,), "synaptic": (size, size), "shared": (1,)}[delay_type]
        init = delay_fns.parse_init(delay_init)
        self.delay_init = getattr(init, "description", str(delay_init))
        initial = init(delay_shape, generator)
        if not torch.is_tensor(initial) or initial.shape != delay_shape:
            got = tuple(initial.shape) if torch.is_tensor(initial) else type(initial).__name__
            raise ValueError(
                f"delay_init {self.delay_init} gave {got}; {delay_type} delays of DelRec({size}) "
                f"need a tensor of shape {delay_shape}: a callable delay_init(shape, generator) "
                "must return one of the shape it is given"
            )
        initial = initial.to(self.weight.dtype)  # float32, or the default dtype if set
        if round_init:
            initial = initial.round()
        delay_fns.check_delays(initial, f"delay_init {self.delay_init}")
        initial = delay_fns.clamp_initial(
            initial,
            self.max_delay,
            f"DelRec({size}), delay_init {self.delay_init}",
            "draw them within the limit (e.g. delay_init uniform:0:"
            f"{self.max_delay}) to avoid the pile-up",
        )
        self.delay = nn.Parameter(initial, requires_grad=learn_delays)
        self.spread_logits = nn.Parameter(torch.zeros(size)) if learn_spread else None
        self.register_buffer("sigma", torch.tensor(delay_fns.check_sigma(sigma)))
        self._warned_negative = False  # DelayLimitWarning of delays below 0 given

    # ------------------------------------------------------------------ variants
    @classmethod
    def vanilla(cls, size: int, neuron: nn.Module | None = None, **kwargs) -> DelRec:
        """Plain recurrent layer: every delay 0 (one step), frozen, σ = 0."""
        return cls(size, neuron, delay_init=0.0, learn_delays=False, **kwargs)

    @classmethod
    def fixed(
        cls, size: int, neuron: nn.Module | None = None, delay_init="uniform:0:10", **kwargs
    ) -> DelRec:
        """Fixed random integer delays: drawn from ``delay_init``, rounded, frozen, σ = 0."""
        return cls(
            size, neuron, delay_init=delay_init, learn_delays=False, round_init=True, **kwargs
        )

    # ------------------------------------------------------------------ kernel
    @property
    def uses_integer_delays(self) -> bool:
        """True when this forward runs with rounded delays and no spread (eval mode)."""
        return not self.training and self.integer_eval

    def delays_and_width(self) -> tuple[Tensor, Tensor | float]:
        """Delays broadcast to ``(N,)`` or ``(N, N)`` and the kernel half-width for this forward.

        A delay below 0 (possible only between an optimizer step and the clamp) is used as it
        is in training, so the kernel loses the part of its mass that falls below lag 1; the
        integer-delay mode rounds it to 0.
        """
        delay, width = self._training_delays_and_width()
        if self.uses_integer_delays:
            return delay_fns.integer_delays(delay), 1.0
        return delay, width

    def _training_delays_and_width(self) -> tuple[Tensor, Tensor | float]:
        """The delays ``(N,)`` or ``(N, N)`` and kernel half-width of a training forward."""
        delay = self.delay.expand(self.size) if self.delay_type == "shared" else self.delay
        sigma = float(self.sigma) if self.learn_delays else 0.0
        return delay, delay_fns.spread_width(sigma, self.spread_logits)

    def kernel(self) -> Tensor:
        """Interpolation kernel ``κ``: ``(N, L)`` (axonal, shared) or ``(N, N, L)`` (synaptic)."""
        return delay_fns.recurrent_kernel(*self.delays_and_width())

    # ------------------------------------------------------------------ forward
    @torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
    @own_precision  # under autocast: in the layer's dtype, on every engine
    def forward(
        self,
        current: Tensor,
        state: DelRecState | None = None,
        *,
        return_state: bool = False,
        dropout_mask: Tensor | None = None,
        input_dropout: MaskDraw | None = None,
        output_dropout: MaskDraw | Callable[[], MaskDraw | None] | None = None,
    ) -> Tensor | tuple[Tensor, DelRecState]:
        """Input current ``(T, B, N)`` or ``(T, N)`` → spikes of the same shape.

        ``state``: start from the :class:`DelRecState` a previous chunk of the same sequences
        returned (its neurons, spike history and dropout mask) instead of zero history and a
        fresh mask; ``return_state=True`` returns ``(spikes, state)``, the state after the last
        step (batched, ``B = 1`` for an unbatched input). Running a sequence in chunks this way
        gives the spikes of one pass. A returned state carries no gradient (chunks are
        truncated BPTT); gradients reach a given state. In eval mode a state's dropout mask is
        not applied (recurrent dropout is the identity there) but stays in the returned state.
        ``dropout_mask`` ``(B, N)`` overrides the recurrent dropout mask, in either mode (for
        tests and replay). ``input_dropout``: drop elements of
        ``current`` with this mask (:mod:`delrec.engine.dropout`, as
        :class:`~delrec.layers.dropout.Dropout` does) before the layer: inside the engine's loop
        where the path can (``cpp-axonal``), saving the dropped current's pass through memory,
        else in front of it; the same result either way. ``output_dropout``: return the spikes
        dropped with this mask (the recurrence runs on the spikes themselves), in the engine's
        loop where the path can, else behind it; or a function that draws the mask, called
        after the layer has drawn its recurrent dropout mask (so that the random draws come in
        the order of the layer followed by a :class:`~delrec.layers.dropout.Dropout`).
        """
        unbatched = current.dim() == 2
        if unbatched:
            current = current.unsqueeze(1)
        self._check_input(current)
        if state is not None:
            self._check_state(state, current)
        mask = self._recurrent_mask(current, state, dropout_mask)
        # a state's mask stays with the sequence, but dropout is the identity in eval
        applied = mask if self.training or dropout_mask is not None else None
        if callable(output_dropout):
            output_dropout = output_dropout()
        for name, draw in (("input_dropout", input_dropout), ("output_dropout", output_dropout)):
            if draw is not None and not isinstance(draw, MaskDraw):
                raise TypeError(
                    f"{name} must be a delrec.engine.dropout.MaskDraw, e.g. "
                    f"delrec.engine.dropout.draw(p) for probability p, or None; got "
                    f"{type(draw).__name__}"
                )
        self._check_values(current, state, mask)
        used = (current, self.weight, self.delay, self.spread_logits)  # even if set by hand
        wants_grad = torch.is_grad_enabled() and (
            any(x is not None and x.requires_grad for x in used)
            or any(p.requires_grad for p in self.parameters())
            or (state is not None and any(x.requires_grad for x in (*state.neuron, state.spikes)))
        )
        if wants_grad and current.device.type == "cpu":
            cpu.warn_if_subnormals_kept()
        stateful = state is not None or return_state
        delay, width = self.delays_and_width()
        path = select(
            self.delay_type,
            self.neuron,
            device=current.device,
            integer=self.uses_integer_delays,
            grad=wants_grad,
            engine=self.engine,
            state=stateful,
            dtype=current.dtype,
            reach=lambda: kernel_reach(delay, width),
        )
        options = {}  # the masks drawn in the engine's loops, forward and backward
        in_loop = path.loop_dropout and not stateful
        if input_dropout is not None:
            if in_loop and LIFMap.of(self.neuron.p).drives_directly:
                options["input_dropout"] = input_dropout
            else:
                current = fused.dropped(current, input_dropout)
        behind = output_dropout if output_dropout is not None and not in_loop else None
        if output_dropout is not None and in_loop:
            options["output_dropout"] = output_dropout
        if not stateful:
            spikes = path.run(current, self.weight, delay, width, self.neuron, applied, **options)
            if behind is not None:
                spikes = fused.dropped(spikes, behind)
            return spikes.squeeze(1) if unbatched else spikes
        if state is None:
            fresh = tuple(self.neuron.initial_state(current[0]))
            start = RecurrentState(fresh, current.new_zeros(0, *current.shape[1:]))
        else:
            self._check_history(state, delay, width)
            start = RecurrentState(tuple(state.neuron), state.spikes)
        spikes, final = path.run(
            current, self.weight, delay, width, self.neuron, applied, state=start, **options
        )
        raw = spikes  # what the recurrence ran on, before output dropout
        if behind is not None:
            spikes = fused.dropped(spikes, behind)
        spikes = spikes.squeeze(1) if unbatched else spikes
        if not return_state:
            return spikes
        if self.uses_integer_delays:
            final = self._training_history(start, raw, final)
        neuron_state = tuple(x.detach() for x in final.neuron)
        before = 0 if state is None else state.steps
        seen = None if before is None else before + current.shape[0]
        return spikes, DelRecState(neuron_state, final.spikes, mask, seen)

    def _training_history(
        self, start: RecurrentState, spikes: Tensor, final: RecurrentState
    ) -> RecurrentState:
        """``final`` with as many steps of spikes as a training forward would keep: a state made
        in eval mode (integer delays reach less far back than the spread kernels) can then
        continue the sequence in training. ``spikes``: the chunk's ``(T, B, N)``."""
        reach = history_length(*self._training_delays_and_width())
        length = kept_history(start.spikes, spikes.shape[0], reach)
        if length <= final.spikes.shape[0]:
            return final
        return final._replace(spikes=next_history(start.spikes, spikes, length))

    def _check_history(self, state: DelRecState, delay: Tensor, width) -> None:
        """A ValueError when ``state`` kept fewer steps of spikes than the delays now reach
        and the sequence is longer than that (its older spikes are gone: they would count as
        0); the delays grew since the state was made, e.g. an optimizer step between chunks."""
        kept = state.spikes.shape[0]
        if state.steps is None or state.steps <= kept:
            return
        reach = history_length(delay, width)
        if reach > kept:
            raise ValueError(
                f"this DelRecState keeps the spikes of the last {kept} steps of a sequence "
                f"{state.steps} steps in, but the delays of DelRec({self.size}) now reach "
                f"{reach} steps back (they grew since the state was made, e.g. by an optimizer "
                "step between chunks): the older spikes are gone. Keep a sequence's delays "
                "fixed until its last chunk (step the optimizer between sequences), or run the "
                "sequence again from its start"
            )

    def _recurrent_mask(
        self, current: Tensor, state: DelRecState | None, dropout_mask: Tensor | None
    ) -> Tensor | None:
        """The recurrent dropout mask ``(B, N)`` of the sequence, in the input's dtype: the one
        given, the state's, or a fresh draw (None when recurrent dropout is off or in eval; a
        state made in eval mode has none, and continued in training gets a fresh draw)."""
        if dropout_mask is not None:
            mask, name = dropout_mask, "dropout_mask"
        elif state is not None and state.mask is not None:
            mask, name = state.mask, "state.mask"
        else:
            return self._draw_dropout_mask(current)
        if not torch.is_tensor(mask) or not (
            mask.dtype.is_floating_point or mask.dtype == torch.bool
        ):
            got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise TypeError(f"{name} must hold floats (0 or 1/(1-p)) or booleans, got {got}")
        if mask.shape != current.shape[1:]:
            raise ValueError(
                f"{name} must have shape (B, N) = {tuple(current.shape[1:])}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but the layer takes a dropout mask as a constant (the "
                f"engines give it no gradient); pass {name}.detach()"
            )
        return mask.to(current.dtype)

    def _check_state(self, state: DelRecState, current: Tensor) -> None:
        batch = current.shape[1]
        if not isinstance(state, DelRecState):
            raise TypeError(
                f"state must be the DelRecState a DelRec layer returned, got {type(state).__name__}"
            )
        if state.steps is not None and (not is_whole_number(state.steps) or state.steps < 0):
            raise ValueError(
                f"state.steps must be the whole number of steps the state has seen (>= 0), or "
                f"None for a state made by hand, got {state.steps!r}"
            )
        expected = (batch, self.size)
        spikes = state.spikes
        if spikes.dim() != 3 or tuple(spikes.shape[1:]) != expected:
            raise ValueError(
                f"state.spikes must be (H, B, N) = (H, {batch}, {self.size}), got "
                f"{tuple(spikes.shape)}; a state belongs to the batch it was computed for"
            )
        if spikes.dtype != current.dtype:
            raise TypeError(
                f"state.spikes holds {spikes.dtype}, the input is {current.dtype}; convert the "
                "state, DelRecState(tuple(v.to(dtype) for v in state.neuron), "
                "state.spikes.to(dtype), state.mask), or run the layer in its dtype"
            )
        neuron = type(self.neuron).__name__
        check_state(state.neuron, self.neuron.initial_state(current[0]), f"{neuron} neuron")

    def _check_input(self, current: Tensor) -> None:
        if current.dim() != 3 or current.shape[-1] != self.size:
            raise ValueError(
                f"DelRec expects a time-major input current (T, B, {self.size}) or "
                f"(T, {self.size}), got shape {tuple(current.shape)}; transpose batch-first "
                "data with x.transpose(0, 1)"
            )
        if current.dtype != self.weight.dtype:
            raise TypeError(
                f"input dtype {current.dtype} does not match the layer's "
                f"{self.weight.dtype}; convert one with .to(dtype)"
            )
        if current.shape[0] == 0:
            raise ValueError("input sequence is empty (T = 0)")
        self._check_shapes()

    def _check_shapes(self) -> None:
        """A ValueError for a tensor of the layer replaced by hand with one of another shape
        or float type (:func:`~delrec.layers.sizes.check_tensor_shapes`)."""
        n = self.size
        delay = {"axonal": (n,), "synaptic": (n, n), "shared": (1,)}[self.delay_type]
        shapes = {"weight": (n, n), "delay": delay, "sigma": (), "spread_logits": (n,)}
        check_tensor_shapes(
            f"DelRec({n})",
            {name: (getattr(self, name), shape) for name, shape in shapes.items()},
            self.weight.dtype,
            f" ({self.delay_type} delays)",
        )

    def _check_values(
        self, current: Tensor, state: DelRecState | None, mask: Tensor | None
    ) -> None:
        """What may change between forwards, with one device sync: the input current, the
        weights, the spread logits, a given state and dropout mask are finite, the delays are
        finite and within ``±MAX_DELAY`` (a value set after construction) and, in eval mode,
        at most ``max_delay``, σ is a valid spread, the dropout mask is not below 0.
        Raises ValueError naming the bad value. Each tensor is checked through its sum (NaN and
        Inf propagate into it): one vectorised pass, 1-3 % of a forward
        (benchmarks/bench_checks.py); only a non-finite sum is looked at element by element."""
        delay = self.delay.detach()
        named = {"the input current": current, "the weights": self.weight}
        if self.spread_logits is not None:
            named["the spread logits"] = self.spread_logits
        if state is not None:
            named |= {"the state's spike history": state.spikes}
            named |= {f"the state's neuron tensor {k}": x for k, x in enumerate(state.neuron)}
        if mask is not None:
            named["the recurrent dropout mask"] = mask
        sums = [
            x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32))
            for x in named.values()
        ]
        # in eval mode, as a chip runs them, the delays also keep within max_delay
        limit = self.max_delay if not self.training and self.max_delay is not None else None
        fine = torch.stack(sums).isfinite().all() & (delay.abs() <= delay_fns.MAX_DELAY).all()
        if limit is not None:
            fine = fine & (delay <= limit).all()
        if mask is not None:
            fine = fine & (mask >= 0).all()
        if bool(
            fine & (delay >= 0).all() & (self.sigma >= 0) & (self.sigma <= delay_fns.MAX_DELAY)
        ):
            return
        if limit is not None and bool(delay.isfinite().all()) and delay.max() > limit:
            raise ValueError(
                f"the delays of DelRec({self.size}) reach {delay.max().item():.4g} steps, beyond "
                f"its max_delay = {limit}: clamp them (delrec.layers.clamp_delays(model)) after "
                "loading weights and after every optimizer step"
            )
        if mask is not None and bool((mask < 0).any()):
            raise ValueError(
                f"the recurrent dropout mask holds {mask.min().item():.4g}: a dropout mask keeps "
                "(1/(1-p), or True) or drops (0, or False) each neuron's spikes, never below 0"
            )
        for name, x in named.items():
            if name != "the input current" and not bool(x.detach().isfinite().all()):
                raise ValueError(
                    f"{name} of DelRec({self.size}) hold NaN or Inf: the layer "
                    "would fire nothing and every gradient would be NaN; find where they came "
                    "from (torch.isfinite), e.g. a diverged training run (restore a checkpoint, "
                    "lower the learning rate)"
                )
        refuse_nonfinite(current, f"DelRec({self.size})")
        delay_fns.check_delays(delay, f"DelRec({self.size}) delays")
        delay_fns.check_sigma(self.sigma, f"DelRec({self.size}).sigma")
        if delay.min() < 0 and not self._warned_negative:
            self._warned_negative = True  # once per layer
            user_warnings.warn(
                f"the delays of DelRec({self.size}) go down to {delay.min().item():.4g} steps, "
                "below 0: training cuts the synapses of a delay <= -1 step, and their "
                "gradients, while eval and a chip round it to 0; call "
                "delrec.layers.clamp_delays(model) after every optimizer step",
                delay_fns.DelayLimitWarning,
            )

    @property
    def recurrent_dropout(self) -> float:
        """Probability of dropping a neuron's recurrent input for a whole sequence, in
        training; checked whenever it is set."""
        return self._recurrent_dropout

    @recurrent_dropout.setter
    def recurrent_dropout(self, p: float) -> None:
        self._recurrent_dropout = check_probability(p, "recurrent_dropout")

    def _draw_dropout_mask(self, current: Tensor) -> Tensor | None:
        if not self.training or self.recurrent_dropout == 0:
            return None
        keep = 1.0 - self.recurrent_dropout
        return torch.bernoulli(torch.full_like(current[0], keep)) / keep

    # ------------------------------------------------------------------ constraints
    @torch.no_grad()
    def clamp_delays_(self) -> None:
        """Clamp the delays into ``[0, max_delay]`` (``[0, MAX_DELAY]`` without a limit) in
        place; call after every optimizer step."""
        limit = delay_fns.MAX_DELAY if self.max_delay is None else self.max_delay
        self.delay.clamp_(0, limit)

    def extra_repr(self) -> str:
        spread = "learnable" if self.spread_logits is not None else "shared"
        limit = "" if self.max_delay is None else f"max_delay={self.max_delay}, "
        return (
            f"{self.size}, delay_type={self.delay_type}, delay_init={self.delay_init}, {limit}"
            f"learn_delays={self.learn_delays}, spread={spread}, sigma={float(self.sigma):.4g}, "
            f"recurrent_dropout={self.recurrent_dropout}, engine={self.engine}"
        )

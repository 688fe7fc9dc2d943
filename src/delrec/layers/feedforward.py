"""Feedforward learnable delays: the DCLS-style baseline of the paper
(docs/design.md#feedforward-delays; its engines and DCLS's edges: docs/feedforward-delays.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from delrec import user_warnings
from delrec.delays import MAX_DELAY, DelayLimitWarning, check_max_delay, clamp_initial
from delrec.engine import feedforward as engines
from delrec.layers.precision import own_precision
from delrec.layers.sizes import check_size, check_tensor_shapes

INITS = ("uniform-sqrt6", "torch")


def weight_bound(init: str, fan_in: int) -> float:
    """Half-width of the uniform initial weights of a feedforward layer: ``sqrt(6/fan_in)``
    for ``"uniform-sqrt6"`` (the paper's Kaiming), ``1/sqrt(fan_in)`` for ``"torch"``
    (``nn.Linear``'s default). Biases are ``U(±1/sqrt(fan_in))`` either way."""
    if init not in INITS:
        raise ValueError(f"feedforward_init must be one of {', '.join(INITS)}, got {init!r}")
    return math.sqrt(6.0 / fan_in) if init == "uniform-sqrt6" else 1 / math.sqrt(fan_in)


class FeedforwardDelay(nn.Module):
    """Dense layer whose synapses carry a weight and a learnable delay in ``[0, K-1]`` steps.

    Synapse ``(o, i)`` with weight ``w`` and position ``P`` contributes
    ``w·x_i[t - P]``; a non-integer ``P`` splits ``w`` linearly between the two taps around
    it: the layer is a causal convolution over time with a ``K``-tap kernel (left padding
    ``K-1``), computed by default with two taps per synapse, at a cost and a memory independent of
    ``K`` (:mod:`delrec.engine.feedforward`). Input ``(T, B, I)`` → output ``(T, B, O)``. In eval
    mode the positions are rounded (without changing the parameters), as a chip runs them; set
    ``integer_eval = False`` to evaluate with the real-valued positions. Its state between chunks
    of a sequence is the last ``K-1`` input frames ``(K-1, B, I)`` (see :meth:`forward`).

    ``engine``: ``"auto"`` (C++ kernels on the CPU, PyTorch ops elsewhere), ``"reference"``
    (the convolution), or a path of :data:`delrec.engine.feedforward.PATHS` by name.
    ``max_delay``: the longest delay (position) allowed, integer steps (a chip's limit,
    docs/deployment.md#chips-delay-limits), or ``None`` (no limit but the window). Positions
    live in ``[0, min(K-1, max_delay)]``; initial positions above ``max_delay`` are clamped to
    it with a :class:`~delrec.delays.DelayLimitWarning`. ``init``: the initial weights, one of
    :data:`INITS` (:func:`weight_bound`); the positions start uniform in the window.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 26,
        bias: bool = True,
        generator: torch.Generator | None = None,
        engine: str = "auto",
        max_delay: int | None = None,
        init: str = "uniform-sqrt6",
    ):
        super().__init__()
        self.register_load_state_dict_post_hook(self._warn_of_positions_beyond_the_window)
        in_features = check_size(in_features, "FeedforwardDelay in_features")
        out_features = check_size(out_features, "FeedforwardDelay out_features")
        kernel_size = check_size(kernel_size, "FeedforwardDelay kernel_size (taps)")
        if not 1 <= kernel_size <= MAX_DELAY + 1:
            raise ValueError(
                f"kernel_size must be between 1 and {MAX_DELAY + 1:g} steps (delays of 0 … "
                f"MAX_DELAY = {MAX_DELAY:g} steps), got {kernel_size}"
            )
        if engine not in engines.ENGINES:
            raise ValueError(
                f"unknown feedforward-delay engine {engine!r}; choose one of {engines.ENGINES}"
            )
        self.engine = engine
        self.max_delay = check_max_delay(max_delay)
        self.in_features, self.out_features, self.kernel_size = (
            in_features,
            out_features,
            kernel_size,
        )
        bound = weight_bound(init, in_features)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
        )
        self.integer_eval = True  # eval mode rounds the positions (see the class docstring)
        initial = (kernel_size - 1) * torch.rand(out_features, in_features, generator=generator)
        self.position = nn.Parameter(
            clamp_initial(
                initial,
                self.max_delay,
                f"FeedforwardDelay({in_features}, {out_features}, kernel_size={kernel_size})",
                f"set the window to the limit (kernel_size = max_delay + 1 = "
                f"{(self.max_delay or 0) + 1}, network.ff_delay_window) to avoid the pile-up",
            )
        )
        self.bias = (
            nn.Parameter(
                torch.empty(out_features).uniform_(
                    -1 / math.sqrt(in_features), 1 / math.sqrt(in_features), generator=generator
                )
            )
            if bias
            else None
        )

    def _warn_of_positions_beyond_the_window(self, _module, _keys) -> None:
        """After ``load_state_dict``: a DelayLimitWarning where loaded positions reach ``K`` or
        more, where no tap of the window is left (the weights and positions have the same
        shapes whatever ``K``, so a layer of another window loads without an error)."""
        position = self.position.detach()
        beyond = position >= self.kernel_size
        if bool(beyond.any()):
            user_warnings.warn(
                f"{int(beyond.sum())} of the {position.numel()} positions loaded into "
                f"FeedforwardDelay({self.in_features}, {self.out_features}, kernel_size="
                f"{self.kernel_size}) lie at or beyond the window (up to "
                f"{position.max().item():.4g} steps, the window ends at K-1 = "
                f"{self.kernel_size - 1}): those synapses count for nothing. Were they saved "
                "from a layer with a wider window? Build this one with that kernel_size (or "
                "clamp them with delrec.layers.clamp_delays(model))",
                DelayLimitWarning,
            )

    def effective_position(self) -> Tensor:
        """The positions the forward uses: the parameter in training (and in eval with
        ``integer_eval = False``), rounded (and detached) in eval."""
        if self.training or not self.integer_eval:
            return self.position
        return self.position.detach().round()

    def temporal_kernel(self) -> Tensor:
        """Weights per delay tap, ``(O, I, K)``: index ``k`` is a delay of ``k`` steps."""
        return engines.temporal_kernel(self.weight, self.effective_position(), self.kernel_size)

    @torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
    @own_precision  # under autocast: in the layer's dtype, on every engine
    def forward(
        self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Input ``(T, B, I)`` or ``(T, I)`` → output ``(T, B, O)`` or ``(T, O)``. ``state``:
        the inputs of the previous ``K-1`` steps ``(K-1, B, I)``, oldest first, that a previous
        chunk of the same sequences returned (default: zeros); ``return_state=True`` also
        returns this chunk's, without gradient (batched, ``B = 1`` for an unbatched input)."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FeedforwardDelay expects (T, B, {self.in_features}) or (T, "
                f"{self.in_features}), got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        if x.shape[0] == 0:
            raise ValueError("input sequence is empty (T = 0)")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"FeedforwardDelay runs float32 and float64 inputs, got {x.dtype}; convert the "
                "layer and its input with .float()"
            )
        if x.dtype != self.weight.dtype:
            raise TypeError(
                f"FeedforwardDelay's input ({x.dtype}) and parameters ({self.weight.dtype}) must "
                "share one dtype; convert the layer or the input with .to(dtype)"
            )
        self._check_shapes()
        past = self.kernel_size - 1
        if state is not None and (
            not torch.is_tensor(state)
            or tuple(state.shape) != (past, *x.shape[1:])
            or state.dtype != x.dtype
        ):
            got = (
                f"{tuple(state.shape)} {state.dtype}"
                if torch.is_tensor(state)
                else type(state).__name__
            )
            raise ValueError(
                f"FeedforwardDelay state must be the tensor of the last K-1 inputs ({past}, "
                f"{x.shape[1]}, {self.in_features}) {x.dtype} that return_state=True gave, got "
                f"{got}"
            )
        self._check_values(x, state)
        path = engines.select(x.device, self.engine)
        position = self.effective_position()
        if state is None:
            out = path.run(x, self.weight, position, self.bias, self.kernel_size)
            signal = torch.cat([x.new_zeros(past, *x.shape[1:]), x]) if return_state else x
        else:
            signal = torch.cat([state, x])  # (K-1+T, B, I): the chunk's outputs
            out = path.run(signal, self.weight, position, self.bias, self.kernel_size)[past:]
        out = out.squeeze(1) if unbatched else out
        if return_state:
            return out, signal[signal.shape[0] - past :].detach().clone()
        return out

    def _check_shapes(self) -> None:
        """A ValueError for a weight, position or bias replaced by hand with one of another
        shape or float type (:func:`~delrec.layers.sizes.check_tensor_shapes`)."""
        o, i = self.out_features, self.in_features
        check_tensor_shapes(
            f"FeedforwardDelay({i}, {o})",
            {
                "weight": (self.weight, (o, i)),
                "position": (self.position, (o, i)),
                "bias": (self.bias, (o,)),
            },
            self.weight.dtype,
        )

    def _check_values(self, x: Tensor, state: Tensor | None) -> None:
        """Raises a ValueError naming what holds NaN or Inf: the positions, weights, bias, the
        input or the state; and, in eval mode (as a chip runs them), a position beyond
        ``max_delay`` that still reaches a tap of the window (below ``K``; one beyond the
        window counts nothing, as in training). One device sync: a sum of each (NaN and Inf
        propagate into it)."""
        named = {"positions (delays)": self.position, "weights": self.weight, "input": x}
        if self.bias is not None:
            named["bias"] = self.bias
        if state is not None:
            named["state"] = state
        sums = [
            v.detach().sum(dtype=torch.promote_types(v.dtype, torch.float32))
            for v in named.values()
        ]
        position, limit = self.position.detach(), self.max_delay
        checked = not self.training and limit is not None and limit < self.kernel_size - 1
        over = (position > limit) & (position < self.kernel_size) if checked else None
        fine = torch.stack(sums).isfinite().all()
        if over is not None:
            fine = fine & ~over.any()
        if bool(fine):
            return
        layer = f"FeedforwardDelay({self.in_features}, {self.out_features})"
        for name, value in named.items():
            if not bool(value.detach().isfinite().all()):
                cause = (
                    "e.g. a diverged training run (restore a checkpoint, lower the learning rate)"
                    if isinstance(value, nn.Parameter)
                    else "check the data and the layers before this one"
                )
                raise ValueError(
                    f"NaN or Inf in the {name} of {layer}: find where they came from "
                    f"(torch.isfinite), {cause}"
                )
        if over is None or not bool(over.any()):
            return  # every value is finite: only a sum overflowed
        raise ValueError(
            f"the positions of {layer} reach {position[over].max().item():.4g} steps, beyond "
            f"its max_delay = {limit} (within the window K-1 = {self.kernel_size - 1}): clamp "
            "them (delrec.layers.clamp_delays(model)) after loading weights and after every "
            "optimizer step"
        )

    @property
    def position_limit(self) -> int:
        """The largest position allowed: ``K-1``, or ``max_delay`` when smaller."""
        limit = self.kernel_size - 1
        return limit if self.max_delay is None else min(limit, self.max_delay)

    @torch.no_grad()
    def clamp_delays_(self) -> None:
        """Clamp positions into ``[0, position_limit]`` (the window ``[0, K-1]``, or less with a
        ``max_delay``); call after every optimizer step."""
        self.position.clamp_(0, self.position_limit)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel_size={self.kernel_size}, bias={self.bias is not None}, engine={self.engine}"
            + ("" if self.max_delay is None else f", max_delay={self.max_delay}")
        )

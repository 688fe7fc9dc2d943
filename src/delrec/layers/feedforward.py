"""Feedforward learnable delays: the DCLS-style baseline of the paper
(docs/design.md#feedforward-delays)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeedforwardDelay(nn.Module):
    """Dense layer whose synapses carry a weight and a learnable delay in ``[0, K-1]`` steps.

    Synapse ``(o, i)`` with weight ``w`` and position ``P`` contributes
    ``w·x_i[t - P]``; a non-integer ``P`` splits ``w`` linearly between the two taps around
    it. The layer is a causal convolution over time with a ``K``-tap kernel (left padding
    ``K-1``). Input ``(T, B, I)`` → output ``(T, B, O)``. In eval mode the positions are
    rounded (without changing the parameters). Its state between chunks of a sequence is the
    last ``K-1`` input frames ``(K-1, B, I)`` (see :meth:`forward`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 26,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1 step, got {kernel_size}")
        self.in_features, self.out_features, self.kernel_size = (
            in_features,
            out_features,
            kernel_size,
        )
        bound = math.sqrt(6.0 / in_features)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
        )
        self.position = nn.Parameter(
            (kernel_size - 1) * torch.rand(out_features, in_features, generator=generator)
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

    def temporal_kernel(self) -> Tensor:
        """Weights per delay tap, ``(O, I, K)``: index ``k`` is a delay of ``k`` steps."""
        position = self.position if self.training else self.position.detach().round()
        taps = torch.arange(self.kernel_size, dtype=self.weight.dtype, device=self.weight.device)
        interpolation = (1 - (taps - position.unsqueeze(-1)).abs()).clamp(min=0)
        return self.weight.unsqueeze(-1) * interpolation

    def forward(
        self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Input ``(T, B, I)`` → output ``(T, B, O)``. ``state``: the inputs of the previous
        ``K-1`` steps ``(K-1, B, I)``, oldest first, that a previous chunk of the same sequences
        returned (default: zeros); ``return_state=True`` also returns this chunk's, without
        gradient."""
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FeedforwardDelay expects (T, B, {self.in_features}), got {tuple(x.shape)}"
            )
        past = self.kernel_size - 1
        if state is None:
            state = x.new_zeros(past, *x.shape[1:])
        elif tuple(state.shape) != (past, *x.shape[1:]):
            raise ValueError(
                f"FeedforwardDelay state must be the last K-1 inputs ({past}, {x.shape[1]}, "
                f"{self.in_features}), got {tuple(state.shape)}"
            )
        signal = torch.cat([state.to(x.dtype), x])  # (K-1+T, B, I)
        out = F.conv1d(signal.permute(1, 2, 0), self.temporal_kernel().flip(-1), self.bias)
        out = out.permute(2, 0, 1)
        if return_state:
            return out, signal[signal.shape[0] - past :].detach().clone()
        return out

    @torch.no_grad()
    def clamp_delays_(self) -> None:
        """Clamp positions into the window ``[0, K-1]``; call after every optimizer step."""
        self.position.clamp_(0, self.kernel_size - 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel_size={self.kernel_size}, bias={self.bias is not None}"
        )

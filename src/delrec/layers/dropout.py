"""Dropout of time-major sequences with masks drawn by a counter-based generator."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from delrec.engine import dropout as masks
from delrec.engine import fused


class Dropout(nn.Module):
    """Per-element dropout of a ``(T, B, N)`` sequence with probability ``p`` (identity in eval).

    The mask of each forward is drawn as :mod:`delrec.engine.dropout` describes: a function of
    one key drawn from torch's global CPU generator, so it follows ``torch.manual_seed`` and
    the checkpointed RNG state on every device. ``engine``: ``"fused"`` draws the mask inside
    the multiplication (forward and backward, nothing saved), ``"reference"`` materialises the
    mask and multiplies by autograd; both give the same numbers. ``batch_offset``: in a
    data-parallel run, a function returning the first row of this process's shard of the batch
    (the rows of the whole batch's mask that this process applies).
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = masks.check_probability(p)
        self.engine = "fused"
        self.batch_offset: Callable[[], int] | None = None

    def draw(self) -> masks.MaskDraw | None:
        """The mask of this forward (drawing its key), or None when dropout is off."""
        if not self.training or self.p == 0:
            return None
        return masks.draw(self.p, self.batch_offset() if self.batch_offset is not None else 0)

    def forward(self, x: Tensor) -> Tensor:
        draw = self.draw()
        if draw is None:
            return x
        if x.dim() != 3:
            raise ValueError(f"Dropout expects a time-major (T, B, N) input, got {tuple(x.shape)}")
        if self.engine == "fused":
            return fused.dropped(x, draw)
        return x * fused.dropout_mask(tuple(x.shape), draw, x.dtype, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}, engine={self.engine}"

"""Dropout masks from a counter-based generator: reproducible from the seed, at memory speed.

A mask is a function of one 64-bit key and of each element's position: element ``(t, b, n)`` of
a time-major ``(T, B, N)`` mask, with ``n = 128k + 16j + l`` (``j < 8``, ``l < 16``), is kept
when half ``j div 4`` (0: the low 16 bits, 1: the high ones) of word ``j mod 4`` of the
Philox4x32-10 block (the generator of Salmon et al. 2011, as in Random123, cuRAND and Triton)

    counter = (16k + l, b + batch_offset, t, 0),    key = (key mod 2³², key div 2³²)

is below ``round(keep · 2¹⁶)``: one block draws eight elements, sixteen blocks fill 128
consecutive elements, one 32-bit lane each (a vector of 16 consecutive elements is one half of
one output word of sixteen blocks). A kept element is scaled by ``1/keep`` (computed in the
tensor's dtype), a dropped one is zero. The probability of keeping an element is ``keep``
rounded to a multiple of 2⁻¹⁶ (within 7.7·10⁻⁶ of it). Each mask draws
its key from torch's global CPU generator (:func:`draw`), so masks follow ``torch.manual_seed``
and the RNG state a checkpoint stores, and are the same on every device. Because the mask is a
function of the position, the backward pass draws it again instead of saving it, and a process
that holds rows ``[offset, offset + B)`` of a larger batch draws exactly those rows.

The C++ kernels (``csrc/fused.cpp`` and ``csrc/axonal.cpp``) draw masks inside the loops that
use them; :func:`philox` and :func:`reference_mask` compute the same in PyTorch ops (any
device), and are what the kernels are tested against.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (golden ratio, √3 - 1)
WORD = 0xFFFFFFFF
ROWS = 2**32  # batch rows a mask tells apart (its row counter is one 32-bit word)


@dataclass(frozen=True)
class MaskDraw:
    """One dropout mask: its ``key``, the probability ``keep`` of keeping an element, and the
    batch row of the whole batch that row 0 of the tensor it is applied to holds."""

    key: int
    keep: float
    batch_offset: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.batch_offset < ROWS:
            raise ValueError(
                f"MaskDraw batch_offset must be a row of a batch in [0, 2^32), got "
                f"{self.batch_offset}: the masks count rows in 32 bits"
            )

    @property
    def threshold(self) -> int:
        """An element is kept when its 16-bit draw is below this: ``round(keep · 2¹⁶)``."""
        return round(self.keep * 2**16)

    def scale(self, dtype: torch.dtype) -> float:
        """The value of a kept element, ``1/keep`` rounded to ``dtype``."""
        return float(torch.ones((), dtype=dtype) / self.keep)

    def native(self, dtype: torch.dtype) -> tuple:
        """The mask as the C++ kernels take it: ``(active, key, threshold, scale, offset)``."""
        return (True, self.key, self.threshold, self.scale(dtype), self.batch_offset)


NO_MASK = (False, 0, 0, 1.0, 0)  # the C++ kernels' "no mask"


def native(draw: MaskDraw | None, dtype: torch.dtype) -> tuple:
    """``draw`` as the C++ kernels take it (:data:`NO_MASK` for ``None``)."""
    return NO_MASK if draw is None else draw.native(dtype)


MAX_PROBABILITY = 1 - 2**-16  # the masks keep elements with probabilities in steps of 2⁻¹⁶


def check_probability(p: float, name: str = "dropout probability") -> float:
    """``p`` as a float, or a ValueError naming ``name`` unless ``0 <= p < 1`` (a NaN fails;
    a TypeError unless it is a number) and at most :data:`MAX_PROBABILITY` (beyond it the
    rounded probability of keeping an element is 0 or far from ``1 - p``)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r}")
    if not 0 <= p < 1:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    if p > MAX_PROBABILITY:
        raise ValueError(
            f"{name} = {p} drops more than the masks can resolve: they keep elements with "
            f"probabilities in steps of 2^-16, so p must be at most 1 - 2^-16 = "
            f"{MAX_PROBABILITY:.7f} (beyond it every element was dropped, or the kept ones "
            "scaled by far more than their rate)"
        )
    return float(p)


def draw(p: float, batch_offset: int = 0) -> MaskDraw:
    """A fresh mask dropping elements with probability ``p``: one 63-bit key from torch's global
    CPU generator."""
    check_probability(p)
    key = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return MaskDraw(key, 1.0 - p, batch_offset)


# --------------------------------------------------------------------------- PyTorch ops
def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a·m`` for int64 ``a`` in ``[0, 2³²)``, exact in int64
    (``m`` is split in 16-bit halves so that no product overflows)."""
    upper = a * (m >> 16)  # < 2⁴⁸
    low = a * (m & 0xFFFF) + ((upper & 0xFFFF) << 16)  # < 2⁴⁹
    return (upper >> 16) + (low >> 32), low & WORD


def philox(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: int) -> list[Tensor]:
    """Philox4x32-10 of the four counter words (int64 tensors of values in ``[0, 2³²)``, any
    broadcastable shapes) under the 64-bit ``key``: the four output words, int64."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & WORD, (key >> 32) & WORD
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & WORD, (k1 + PHILOX_W[1]) & WORD
    return [c0, c1, c2, c3]


def mask_draws(shape: tuple[int, int, int], draw: MaskDraw, device=None) -> Tensor:
    """The 16-bit draws (int64) behind the mask of a ``(T, B, N)`` tensor."""
    steps, batch, n = shape
    if draw.batch_offset + batch > ROWS:
        raise ValueError(
            f"rows {draw.batch_offset}…{draw.batch_offset + batch - 1} of a batch: the masks "
            "tell apart 2^32 rows only"
        )
    chunks = (n + 127) // 128

    def arange(size, view):
        return torch.arange(size, dtype=torch.int64, device=device).view(view)

    counter = (
        arange(16 * chunks, (1, 1, 16 * chunks)),
        arange(batch, (1, batch, 1)) + draw.batch_offset,
        arange(steps, (steps, 1, 1)),
        torch.zeros((), dtype=torch.int64, device=device),
    )
    words = torch.stack(torch.broadcast_tensors(*philox(counter, draw.key)), dim=-2)
    halves = torch.cat([words & 0xFFFF, words >> 16], dim=-2)  # (T, B, 8, 16·chunks): j = 4h + w
    # element 128k + 16j + l = draw j of block 16k + l
    halves = halves.view(steps, batch, 8, chunks, 16).transpose(2, 3)
    return halves.reshape(steps, batch, 128 * chunks)[..., :n]


def reference_mask(
    shape: tuple[int, int, int], draw: MaskDraw, dtype=torch.float32, device=None
) -> Tensor:
    """The mask of a ``(T, B, N)`` tensor in PyTorch ops: ``1/keep`` where kept, 0 where
    dropped."""
    kept = mask_draws(shape, draw, device) < draw.threshold
    return kept.to(dtype) / draw.keep

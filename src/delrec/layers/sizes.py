"""The one check of a layer's width (neurons, inputs, outputs, taps) at construction."""

from __future__ import annotations

import numbers


def check_size(value, what: str) -> int:
    """``value`` as an int, or a ValueError naming ``what`` unless it is a whole number ≥ 1
    (a bool is not a size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(value)

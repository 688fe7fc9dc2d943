"""The one check of a layer's width (neurons, inputs, outputs, taps) at construction, and of
whole-number settings."""

from __future__ import annotations

import numbers


def is_whole_number(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), a bool not counting as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_size(value, what: str) -> int:
    """``value`` as an int, or a ValueError naming ``what`` unless it is a whole number ≥ 1
    (a bool is not a size)."""
    if not is_whole_number(value) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(value)

"""The one check of a layer's width (neurons, inputs, outputs, taps) at construction, of
whole-number settings, and of tensors replaced by hand after it."""

from __future__ import annotations

import numbers


def is_whole_number(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), a bool not counting as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_size(value, what: str) -> int:
    """``value`` as an int, or a ValueError naming ``what`` unless it is a whole number ≥ 1
    (a bool is not a size)."""
    if not is_whole_number(value) or value < 1:
        tensor = type(value).__module__.startswith("torch")
        hint = " (a Python int: int(...) of the tensor)" if tensor else ""
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}{hint}")
    return int(value)


def check_tensor_shapes(layer: str, expected: dict, dtype, note: str = "") -> None:
    """A ValueError naming the first tensor of ``expected`` (``{name: (tensor or None,
    shape)}``) of ``layer`` (its name in messages, ``"DelRec(5)"``) whose shape is not
    ``shape`` or whose float type is not ``dtype``: a tensor replaced by hand
    (``layer.bias = nn.Parameter(...)``; ``load_state_dict`` checks its own), which some
    engines would broadcast and others fail on with a bare error. ``note``: what the shapes
    depend on, said after the expected one."""
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            problem = f"has shape {tuple(tensor.shape)}, the layer's is {shape}{note}"
        elif tensor.dtype != dtype:
            problem = f"is {tensor.dtype}, the layer's weight {dtype}"
        else:
            continue
        raise ValueError(
            f"{layer}.{name} {problem}: a tensor replaced by hand must keep the layer's shape "
            "and float type; build a new layer for other sizes, or convert the whole layer "
            "with .to(dtype)"
        )

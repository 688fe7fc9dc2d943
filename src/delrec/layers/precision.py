"""Mixed precision: under ``torch.autocast`` the delay layers and the networks built of them run
in their parameters' dtype, on every engine alike (docs/layer.md#mixed-precision)."""

from __future__ import annotations

import functools

import torch

HALF = (torch.float16, torch.bfloat16)


def own_precision(forward):
    """Decorate a module's ``forward(self, x, ...)``: ``x`` must be a tensor (a TypeError
    naming the module otherwise); under autocast, a half-precision input ``x`` is cast to the
    module's dtype (its ``weight``'s, else its first parameter's) and autocast is off inside, so
    the reference engine's products compute what the compiled engines do (autocast never
    reaches those, and they run float32 and float64 only)."""

    @functools.wraps(forward)
    def run(self, x, *args, **kwargs):
        if not torch.is_tensor(x):
            raise TypeError(
                f"{type(self).__name__} takes a tensor, got {type(x).__name__}; convert it with "
                "torch.as_tensor(x, dtype=torch.float32)"
            )
        if not torch.is_autocast_enabled(x.device.type):
            return forward(self, x, *args, **kwargs)
        if x.dtype in HALF:
            weight = getattr(self, "weight", None)
            x = x.to(weight.dtype if torch.is_tensor(weight) else next(self.parameters()).dtype)
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x, *args, **kwargs)

    return run

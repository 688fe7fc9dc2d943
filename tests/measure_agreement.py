"""How closely each engine path agrees with the reference at training size: the figures behind
the gradient tolerances of tests/engine_harness.py (docs/testing.md). Run by hand::

    python tests/measure_agreement.py

For every training-size case of ``test_engine_paths.py`` and every path that runs it, on one
and two threads, it prints the smallest per-entry ``rtol`` that would pass each gradient
(``max |a - e| / (|e| + floor·rms(e))``, module docstring of the harness; measured, not
checked) and the samples left out after a float32 threshold tie, then the worst per dtype and
path, and the tolerance.
"""

import math
from collections import defaultdict
from unittest import mock

import engine_harness
import torch
from engine_harness import GRAD_TOLERANCE, Config
from test_engine_paths import TRAINING, check_every_path, training_case


def main() -> None:
    # measure, don't judge: every gradient passes, its figure is printed
    tolerance = dict(GRAD_TOLERANCE)
    unbounded = {dtype: (math.inf, floor) for dtype, (_, floor) in tolerance.items()}
    with mock.patch.dict(engine_harness.GRAD_TOLERANCE, unbounded):
        measure(tolerance)


def measure(tolerance: dict) -> None:
    worst = defaultdict(float)
    for name, (delay_type, dtype, *settings) in TRAINING.items():
        case = training_case(delay_type, dtype, *settings)
        found = check_every_path(Config(delay_type, dtype=dtype), case, thread_counts=(1, 2))
        for (path, count), agreement in found.items():
            errors = " ".join(f"{k} {v:.1e}" for k, v in agreement.error.items())
            tied = f", {len(agreement.tied)} tied samples" if agreement.tied else ""
            print(f"{name:34s} {path:15s} {count} thread(s): {errors}{tied}", flush=True)
            key = (str(dtype).removeprefix("torch."), path)
            worst[key] = max(worst[key], agreement.worst())
    print()
    for (dtype, path), value in sorted(worst.items()):
        rtol, floor = tolerance[getattr(torch, dtype)]
        print(f"{dtype:8s} {path:15s} worst {value:.1e}  (tolerance {rtol:g}, floor {floor:g})")


if __name__ == "__main__":
    main()

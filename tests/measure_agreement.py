"""How closely each engine path agrees with the reference at training size: the figures behind
the gradient tolerances of tests/engine_harness.py (docs/testing.md). Run by hand::

    python tests/measure_agreement.py

For every training-size case of ``test_engine_paths.py`` and every path that runs it, on one
and two threads, it prints the smallest per-entry ``rtol`` that would pass each gradient
(``max |a - e| / (|e| + floor·rms(e))``, module docstring of the harness), the worst per
dtype and path at the end, and the tolerance in force.
"""

from collections import defaultdict

import torch
from engine_harness import GRAD_TOLERANCE, Config, Expected, compare, paths, reference, threads
from test_engine_paths import TRAINING, training_case


def main() -> None:
    worst = defaultdict(float)
    for name, (delay_type, dtype, *settings) in TRAINING.items():
        case = training_case(delay_type, dtype, *settings)
        expected = Expected(case.bind(reference), case.inputs(), case.grad_out, case.threshold)
        for path in paths(Config(delay_type, dtype=dtype), case.neuron):
            for count in (1, 2):
                with threads(count):
                    agreement = compare(case.bind(path.run), expected)
                errors = " ".join(f"{k} {v:.1e}" for k, v in agreement.error.items())
                print(f"{name:34s} {path.name:15s} {count} thread(s): {errors}", flush=True)
                key = (str(dtype).removeprefix("torch."), path.name)
                worst[key] = max(worst[key], agreement.worst())
    print()
    for (dtype, path), value in sorted(worst.items()):
        rtol, floor = GRAD_TOLERANCE[getattr(torch, dtype)]
        print(f"{dtype:8s} {path:15s} worst {value:.1e}  (tolerance {rtol:g}, floor {floor:g})")


if __name__ == "__main__":
    main()

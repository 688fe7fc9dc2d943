"""What the reliability checks cost: the per-forward value check of a DelRec layer and the
per-step finiteness check of a network's parameters, on the SHD recipe's sizes.

    python benchmarks/bench_checks.py [--size 256] [--batch 256] [--steps 100]
        [--threads 1] [--repeats 9] [--target 0.05] [--device cpu|cuda]

Each check is timed on its own and next to the work it guards, alternately, repeated, and the
medians kept, so that the ratio is measured side by side on a shared machine:

* ``train``: ``DelRec._check_values`` against forward + backward of one float32
  ``DelRec(size)`` with the SHD neuron, delays ~ U(10, 30), σ = 5 (the training path);
* ``eval``: the same check against a forward in eval mode under ``no_grad`` (integer delays,
  the ring path), where it is the largest share of the work;
* ``step``: ``Trainer._check_finite`` of the SHD network (2 × 256 hidden, BatchNorm, 140
  inputs) against one training step (forward, backward, AdamW step).

The check runs right after the work has pushed its input out of the cache: an upper bound of
its cost inside a forward, where the input was just written by the layer before. Prints one
line per pair and PASS/FAIL against ``--target`` (the largest acceptable cost, as a
fraction of the guarded work).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from delrec.bench import median_times
from delrec.config import resolve
from delrec.data import dataset_info
from delrec.layers import DelRec
from delrec.models import build_network
from delrec.training.loop import Trainer

SHD = dataset_info("shd")  # its sizes: 140 input channels, 20 classes


def device_clock(device: torch.device):
    """``time.perf_counter`` that first waits for the work queued on a GPU ``device``."""

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def layer_timers(size: int, batch: int, steps: int, device: torch.device):
    """The layer's training step, its eval forward, and its value check on the same input."""
    config = resolve("shd").network_config(SHD.input_size, SHD.output_size)
    g = torch.Generator().manual_seed(0)
    layer = DelRec(size, config.neuron.build(), delay_init="uniform:10:30", sigma=5.0, generator=g)
    layer.to(device)
    current = (torch.rand(steps, batch, size, generator=g) * 1.2).to(device).requires_grad_()

    def train():
        layer.train()
        layer(current).sum().backward()

    def evaluate():
        layer.eval()
        with torch.no_grad():
            layer(current)

    return train, evaluate, lambda: layer._check_values(current, None, None)


def step_timers(batch: int, steps: int, device: torch.device):
    """One SHD training step, and the parameter check the Trainer runs after it."""
    network = build_network(
        resolve("shd").network_config(SHD.input_size, SHD.output_size), seed=0
    ).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    frames = (torch.rand(steps, batch, SHD.input_size) < 0.05).float().to(device)

    def step():
        network.train()
        optimizer.zero_grad(set_to_none=True)
        network(frames).sum().backward()
        optimizer.step()

    trainer = mock.Mock(spec=Trainer, network=network)
    return step, lambda: Trainer._check_finite(trainer, 0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = f"{args.threads} CPU thread(s)" if device.type == "cpu" else str(device)
    print(
        f"DelRec({args.size}) on (T, B) = ({args.steps}, {args.batch}), float32, {where}, "
        f"median of {args.repeats}"
    )
    train, evaluate, value_check = layer_timers(args.size, args.batch, args.steps, device)
    step, parameter_check = step_timers(args.batch, args.steps, device)
    verdicts = []
    for name, work, check in (
        ("train", train, value_check),
        ("eval", evaluate, value_check),
        ("step", step, parameter_check),
    ):
        timed = median_times({"work": work, "check": check}, args.repeats, device_clock(device))
        work_s, check_s = timed["work"], timed["check"]
        verdicts.append(check_s <= args.target * work_s)
        print(
            f"{name:5s}  work {work_s * 1e3:9.2f} ms  check {check_s * 1e3:7.3f} ms  "
            f"cost {check_s / work_s:.2%}"
        )
    ok = all(verdicts)
    print(f"{'PASS' if ok else 'FAIL'} every check costs at most {args.target:.0%} of its work")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

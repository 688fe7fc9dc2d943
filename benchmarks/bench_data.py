"""Data loader throughput, next to the time of one training step of the paper's network.

    python benchmarks/bench_data.py [--batch 256] [--step-batch 32] [--no-step]

SHD, SSC and PS-MNIST run on generated files of the real layout (written to a temporary
folder: SHD/SSC-like spike trains of ~5,000 spikes per sample, random 28×28 idx images);
psmnist-mini, digits-8x8 and mackey-glass use their real data. For each data set it prints
the first load (HDF5 parse + binning + cache write), the cached reload, the loader's
samples/s (single process, shuffled, ``--batch`` items per batch) and the time of one
training step (forward, backward, Adam step) of the preset DelRec network on a batch of
``--step-batch`` items of that data set (the faster of two steps), with the share of that
time the loading of those items takes.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from delrec.data import TripleAugmented, load_dataset, make_loader
from delrec.data.heidelberg import write_heidelberg

PRESET = {
    "shd": "shd",
    "shd+augment": "shd",
    "ssc": "ssc",
    "psmnist": "psmnist",
    "psmnist-mini": "psmnist",
    "digits-8x8": "psmnist",
    "mackey-glass": "mackey-glass",
}


def write_spike_file(path: Path, samples: int, classes: int, max_time: float, seed: int):
    """A Heidelberg-layout file with ~5,000 spikes per sample over 0.5…max_time s."""
    rng = np.random.default_rng(seed)
    trains = []
    for _ in range(samples):
        k = int(rng.integers(4000, 6000))
        trains.append(
            (np.sort(rng.uniform(0, rng.uniform(0.5, max_time), k)), rng.integers(0, 700, k))
        )
    write_heidelberg(path, trains, rng.integers(0, classes, samples))


def write_idx(path: Path, array: np.ndarray):
    path.write_bytes(
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def make_files(root: Path, samples: int) -> None:
    (root / "shd").mkdir()
    (root / "ssc").mkdir()
    (root / "mnist").mkdir()
    write_spike_file(root / "shd" / "shd_train.h5", samples, 20, 1.4, 0)
    write_spike_file(root / "ssc" / "ssc_train.h5", samples, 35, 1.4, 1)
    rng = np.random.default_rng(2)
    write_idx(root / "mnist" / "train-images-idx3-ubyte", rng.integers(0, 256, (6000, 28, 28)))
    write_idx(root / "mnist" / "train-labels-idx1-ubyte", rng.integers(0, 10, 6000))


def open_dataset(name: str, root: Path):
    if name in ("shd", "shd+augment"):
        ds = load_dataset("shd", root=root / "shd")
        return TripleAugmented(ds, seed=0) if name == "shd+augment" else ds
    if name == "ssc":
        return load_dataset("ssc", root=root / "ssc")
    if name == "psmnist":
        return load_dataset("psmnist", root=root / "mnist", valid_size=1000)
    return load_dataset(name)


def samples_per_second(ds, batch: int, max_items: int) -> float:
    loader = make_loader(ds, batch_size=batch, shuffle=True, seed=0)
    start, seen = time.perf_counter(), 0
    for _frames, _lengths, targets in loader:
        seen += len(targets)
        if seen >= max_items:
            break
    return seen / (time.perf_counter() - start)


def training_step_seconds(preset: str, ds, batch: int) -> float:
    from delrec.models import build_network, preset_network, readout_reduce

    cfg = preset_network(preset)
    net = build_network(cfg, seed=0)
    optimizer = torch.optim.Adam(net.parameters())
    frames, _, _ = next(iter(make_loader(ds, batch_size=batch)))
    times = []
    for _ in range(2):  # the first step also pays one-time set-up costs: keep the faster
        start = time.perf_counter()
        optimizer.zero_grad()
        readout_reduce(net(frames), cfg.readout).square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="loader batch size")
    parser.add_argument("--step-batch", type=int, default=32, help="training-step batch size")
    parser.add_argument("--samples", type=int, default=2000, help="generated SHD/SSC samples")
    parser.add_argument("--max-items", type=int, default=6000, help="items read per loader")
    parser.add_argument("--no-step", action="store_true", help="skip the training steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_files(root, args.samples)
        print(
            f"{'data set':13s} {'items':>6s} {'1st load s':>10s} {'reload s':>8s} "
            f"{'samples/s':>10s} {'ms/batch':>8s} {'step s':>7s} {'load/step':>9s}"
        )
        for name, preset in PRESET.items():
            start = time.perf_counter()
            ds = open_dataset(name, root)
            first = time.perf_counter() - start
            start = time.perf_counter()
            open_dataset(name, root)
            reload = time.perf_counter() - start
            rate = samples_per_second(ds, args.batch, args.max_items)
            step_columns = f"{'-':>7s} {'-':>9s}"
            if not args.no_step:
                step = training_step_seconds(preset, ds, args.step_batch)
                step_columns = f"{step:7.2f} {args.step_batch / rate / step:9.2%}"
            print(
                f"{name:13s} {len(ds):6d} {first:10.3f} {reload:8.3f} {rate:10.0f} "
                f"{1000 * args.batch / rate:8.1f} {step_columns}",
                flush=True,
            )


if __name__ == "__main__":
    main()

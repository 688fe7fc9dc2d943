"""The frame contract shared with training, and the data set classes that implement it.

Every data set item is ``(frames, target)``:

- ``frames``: float32 tensor of shape ``(T, C)`` — T time steps, C input channels (spike
  counts per bin for SHD/SSC, pixel intensities in [0, 1] for PS-MNIST, series values for
  Mackey-Glass). T may differ between items (SHD).
- ``target``: an ``int`` class label, or a float32 scalar tensor for regression.

:func:`collate_time_major` turns a list of items into a time-major :class:`Batch`.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "valid", "test")


def sample_digest(datasets: Sequence[Dataset]) -> str:
    """A short hex digest of the first, middle and last item of each data set in
    ``datasets``: a cheap fingerprint of their contents, which a copy of the same files keeps
    and other files of the same sizes do not."""
    digest = hashlib.sha256()
    for dataset in datasets:
        count = len(dataset)
        for index in sorted({0, count // 2, count - 1} if count else set()):
            frames, target = dataset[index]
            digest.update(frames.numpy().astype("<f4").tobytes())
            digest.update(repr(torch.as_tensor(target).tolist()).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know about a data set.

    ``input_size``: channels C per time step; ``num_classes``: classes (None for regression);
    ``steps``: time steps T of every item, or None when T varies per item (SHD).
    """

    name: str
    task: str  # "classification" or "regression"
    input_size: int
    num_classes: int | None
    steps: int | None

    @property
    def output_size(self) -> int:
        """Readout width: the class count, or 1 for a regression target."""
        return self.num_classes if self.task == "classification" else 1


class Batch(NamedTuple):
    """A time-major batch.

    ``frames``: (T, B, C) float32, zero-padded after each item's length, T = max length;
    ``lengths``: (B,) int64 true lengths; ``targets``: (B,) int64 labels or float32 targets.
    """

    frames: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor


def collate_time_major(items: Sequence[tuple[torch.Tensor, int | torch.Tensor]]) -> Batch:
    """Stack ``(frames (T_i, C), target)`` items into a :class:`Batch` padded to max T_i."""
    frames = [f for f, _ in items]
    lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
    padded = pad_sequence(frames, batch_first=False)  # (T, B, C)
    targets = [t for _, t in items]
    if isinstance(targets[0], torch.Tensor):
        target_tensor = torch.stack(targets)
    else:
        target_tensor = torch.tensor(targets, dtype=torch.long)
    return Batch(padded, lengths, target_tensor)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` es. With ``seed`` the shuffled order of every
    epoch is reproducible (one generator, advanced epoch after epoch). With ``num_workers``,
    Ctrl-C and SIGTERM stop the main process cleanly (:class:`InterruptibleLoader`)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return InterruptibleLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_time_major,
        generator=generator,
        worker_init_fn=ignore_interruptions if num_workers else None,
    )


INTERRUPTIONS = (signal.SIGINT, signal.SIGTERM)


class InterruptibleLoader(DataLoader):
    """A DataLoader whose worker processes leave Ctrl-C and SIGTERM to the main process.

    A terminal or a scheduler signals the whole process group. A worker that died of it first
    would turn the interruption into a crash ("worker exited unexpectedly"), so workers start
    with both blocked and then ignore them (:func:`ignore_interruptions`). While the workers
    are forked (every epoch) the main process holds both and raises a held one once they run:
    raised inside Python's fork handlers, a ``KeyboardInterrupt`` would be dropped ("Exception
    ignored") and training would go on.
    """

    def __iter__(self):
        if not self.num_workers or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        handlers = {number: signal.getsignal(number) for number in INTERRUPTIONS}
        if None in handlers.values():  # a handler set outside Python cannot be put back
            return super().__iter__()
        held = []  # signals another thread took while this one blocked them
        for number in INTERRUPTIONS:
            signal.signal(number, lambda signum, frame: held.append(signum))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTIONS)  # workers inherit it
        try:
            return super().__iter__()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending one is handled now
            if held:
                signal.raise_signal(held[0])


def ignore_interruptions(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: ignore Ctrl-C and SIGTERM, blocked since the
    fork (the main process stops, then ends its workers)."""
    for number in INTERRUPTIONS:
        signal.signal(number, signal.SIG_IGN)


class SparseFrames(Dataset):
    """Binned spike trains kept as sparse (time bin, channel, count) entries; dense per item.

    Arrays cover all samples of one file; ``indices`` selects the samples of this split.
    Entries of sample i are ``offsets[i]:offsets[i+1]`` of ``steps``/``channels``/``counts``;
    ``lengths[i]`` is its number of time bins.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        info: DatasetInfo,
        split: str,
        indices: np.ndarray | None = None,
    ):
        self.offsets = arrays["offsets"]
        self.steps = arrays["steps"]
        self.channels = arrays["channels"]
        self.counts = arrays["counts"]
        self.sample_lengths = arrays["lengths"]
        self.all_labels = arrays["labels"]
        self.indices = np.arange(len(self.all_labels)) if indices is None else np.asarray(indices)
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels of this split, in item order."""
        return self.all_labels[self.indices].astype(np.int64)

    def dense(self, i: int) -> np.ndarray:
        """Item i's spike counts as a (T_i, C) float32 array."""
        j = self.indices[i]
        lo, hi = self.offsets[j], self.offsets[j + 1]
        out = np.zeros((int(self.sample_lengths[j]), self.info.input_size), dtype=np.float32)
        out[self.steps[lo:hi], self.channels[lo:hi]] = self.counts[lo:hi]
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.dense(i)), int(self.all_labels[self.indices[i]])


class PermutedImages(Dataset):
    """Images read pixel by pixel in a fixed permuted order: item = ((P, 1) intensities, label).

    ``images``: (N, P) uint8 pixels; ``scale`` maps them to [0, 1]; ``permutation``: (P,) int64,
    the order in which pixels are presented (frames[t] = pixel permutation[t]).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        permutation: torch.Tensor,
        scale: float,
        info: DatasetInfo,
        split: str,
    ):
        self.images = images
        self.all_labels = labels.astype(np.int64)
        self.permutation = permutation
        self._perm = permutation.numpy()
        self.scale = scale
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return len(self.all_labels)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels, in item order."""
        return self.all_labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = self.images[i, self._perm].astype(np.float32) * np.float32(self.scale)
        return torch.from_numpy(pixels[:, None]), int(self.all_labels[i])


class SeriesWindows(Dataset):
    """Forecasting windows of a scalar series: item = ((W, 1) past values, target value).

    ``windows``: (N, W) float32 inputs; ``targets``: (N,) float32 values to predict.
    """

    def __init__(self, windows: np.ndarray, targets: np.ndarray, info: DatasetInfo, split: str):
        self.windows = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows[i].unsqueeze(1), self.targets[i]

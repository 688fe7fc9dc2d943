"""SHD augmentation (docs/design.md#shd-augmentation): each training sample is presented
three times per epoch — as it is, with a random temporal shift of every channel, and blended
with another sample of its class.

- shift: each input channel is moved in time by its own integer offset drawn uniformly from
  ``-max_shift…max_shift`` bins; spikes moved outside ``0…T-1`` are dropped (T unchanged).
- blend: the two samples are placed so that their centres of mass in time (count-weighted
  mean bin) coincide (to the nearest bin), each is thinned binomially (every spike kept with
  probability ``thin_p`` > 0) and the two are added; T grows to hold both, except where the data
  set has a fixed number of steps (SSC): there the blend keeps it, and spikes after the last
  step are dropped, as the binning drops them.

Randomness comes from ``numpy.random.default_rng([seed, epoch, index])``: an item depends
only on those three numbers, so it is the same in any worker and any order; call
:meth:`TripleAugmented.set_epoch` each epoch for fresh draws.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError


def shift_channels(frames: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """(T, C) counts with channel c moved by its own offset in -max_shift…max_shift bins."""
    steps, channels = frames.shape
    offsets = rng.integers(-max_shift, max_shift + 1, size=channels)
    t, c = np.nonzero(frames)
    moved = t + offsets[c]
    inside = (moved >= 0) & (moved < steps)
    out = np.zeros_like(frames)
    out[moved[inside], c[inside]] = frames[t[inside], c[inside]]
    return out


def centre_of_mass(frames: np.ndarray) -> float:
    """Count-weighted mean time bin of (T, C) frames; the middle bin when there is no spike."""
    per_step = frames.sum(axis=1)
    total = per_step.sum()
    if total <= 0:
        return 0.5 * (len(frames) - 1)
    return float(np.arange(len(frames)) @ per_step / total)


def blend(a: np.ndarray, b: np.ndarray, thin_p: float, rng: np.random.Generator) -> np.ndarray:
    """Binomially thinned a plus b, both (T_a, C) / (T_b, C) counts, with centres of mass
    aligned in time; returns (T, C) with T large enough for both."""
    align = int(round(centre_of_mass(a) - centre_of_mass(b)))  # > 0: b starts later
    start_a, start_b = max(0, -align), max(0, align)
    steps = max(start_a + len(a), start_b + len(b))
    out = np.zeros((steps, a.shape[1]), dtype=np.float32)
    out[start_a : start_a + len(a)] += rng.binomial(a.astype(np.int64), thin_p)
    out[start_b : start_b + len(b)] += rng.binomial(b.astype(np.int64), thin_p)
    return out


class TripleAugmented(Dataset):
    """A training split presented three times: items ``0…N-1`` are the originals, ``N…2N-1``
    their channel-shifted copies, ``2N…3N-1`` blends of item i with a random other item of
    the same class (shifted instead when i is alone in its class).

    ``base`` must give (T, C) count frames and expose ``labels`` (N,) and ``info``, like the
    SHD data set returned by ``load_dataset("shd", split="train")``.
    """

    def __init__(self, base: Dataset, max_shift: int = 100, thin_p: float = 0.5, seed: int = 0):
        if max_shift < 0 or not 0.0 < thin_p <= 1.0:
            raise DataError(
                f"augmentation needs max_shift >= 0 and 0 < thin_p <= 1 (the probability of "
                f"keeping a spike in a blend; 0 would make every blend empty), got "
                f"max_shift={max_shift}, thin_p={thin_p}"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise DataError(f"augmentation seed must be a whole number >= 0, got {seed!r}")
        self.base = base
        self.max_shift = max_shift
        self.thin_p = thin_p
        self.seed = seed
        self.epoch = 0
        self.info = base.info
        self.split = base.split
        self._labels = np.asarray(base.labels)
        self._same_class = {
            int(k): np.flatnonzero(self._labels == k) for k in np.unique(self._labels)
        }

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of ``epoch`` (an item is fixed by seed, epoch and index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return 3 * len(self.base)

    @property
    def labels(self) -> np.ndarray:
        """(3N,) int64 labels, in item order."""
        return np.tile(self._labels, 3)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        view, i = divmod(index, len(self.base))
        frames, label = self.base[i]
        if view == 0:
            return frames, label
        if not torch.equal(frames, frames.round()):  # blends and shifts move whole spikes
            raise DataError(
                f"augmentation takes spike counts, and item {i} of the data set holds values "
                "that are not whole numbers (intensities?): augment spike data only"
            )
        rng = np.random.default_rng([self.seed, self.epoch, index])
        peers = self._same_class[int(label)]
        if view == 2 and len(peers) > 1:
            partner = peers[rng.integers(len(peers) - 1)]
            partner = partner if partner != i else peers[-1]
            mixed = blend(frames.numpy(), self.base[int(partner)][0].numpy(), self.thin_p, rng)
            return torch.from_numpy(mixed[: self.info.steps]), label  # None: all of it
        return torch.from_numpy(shift_channels(frames.numpy(), self.max_shift, rng)), label

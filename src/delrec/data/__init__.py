"""Data for delrec: SHD, SSC, PS-MNIST, embedded subsets and Mackey-Glass, as time-major frames.

Items are ``(frames (T, C) float32, target)``; :func:`make_loader` batches them into
:class:`Batch` ``(frames (T, B, C), lengths (B,), targets (B,))``.

    >>> ds = load_dataset("digits-8x8", split="train")
    >>> ds.info.input_size, ds.info.num_classes
    (1, 10)
    >>> frames, lengths, labels = next(iter(make_loader(ds, batch_size=4)))
    >>> tuple(frames.shape)
    (64, 4, 1)
"""

from .augment import TripleAugmented
from .core import SPLITS, Batch, DatasetInfo, collate_time_major, make_loader
from .errors import DataError, DownloadError
from .fetch import RESOURCES, download
from .registry import DATASETS, data_root, dataset_info, default_dir, load_dataset, settings_of

__all__ = [
    "Batch",
    "DATASETS",
    "DataError",
    "DownloadError",
    "DatasetInfo",
    "RESOURCES",
    "SPLITS",
    "TripleAugmented",
    "collate_time_major",
    "data_root",
    "dataset_info",
    "default_dir",
    "download",
    "load_dataset",
    "make_loader",
    "settings_of",
]

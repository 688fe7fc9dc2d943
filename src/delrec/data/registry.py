"""The one way in: data sets by name, their settings, and where their files live."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from .core import SPLITS, DatasetInfo
from .errors import DataError
from .heidelberg import Binning, heidelberg_info, load_shd, load_ssc
from .mackey_glass import load_mackey_glass
from .mnist import load_digits_8x8, load_psmnist, load_psmnist_mini, mini_steps

DATASETS: dict[str, Callable[..., Dataset]] = {
    "shd": load_shd,
    "ssc": load_ssc,
    "psmnist": load_psmnist,
    "psmnist-mini": load_psmnist_mini,
    "digits-8x8": load_digits_8x8,
    "mackey-glass": load_mackey_glass,
}
# data set or download name -> its folder under the data root (the others need no files)
FOLDERS = {"shd": "shd", "ssc": "ssc", "psmnist": "mnist", "mnist": "mnist"}

_STATIC_INFO = {
    "psmnist": DatasetInfo("psmnist", "classification", 1, 10, 784),
    "digits-8x8": DatasetInfo("digits-8x8", "classification", 1, 10, 64),
}


def data_root() -> Path:
    """The folder holding one sub-folder per data set: ``$DELREC_DATA`` or ``./data``."""
    return Path(os.environ.get("DELREC_DATA", "data"))


def default_dir(name: str) -> Path:
    """Where the files of ``name`` (a data set or download name) are looked for by default."""
    return data_root() / FOLDERS[name]


def _loader(name: str) -> Callable[..., Dataset]:
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}': choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def settings_of(name: str) -> dict[str, object]:
    """The settings data set ``name`` accepts, with their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(_loader(name)).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def _check_settings(name: str, settings: dict) -> None:
    accepted = settings_of(name)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise DataError(
            f"unknown setting(s) {', '.join(unknown)} for data set '{name}'; it "
            f"accepts: {', '.join(accepted) or 'none'}"
        )


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, **settings
) -> Dataset:
    """Data set ``name`` (see ``DATASETS``), split "train", "valid" or "test".

    Items are ``(frames (T, C) float32, label int)`` — or a float32 scalar target for
    "mackey-glass"; the returned object has ``info`` (:class:`DatasetInfo`) and ``split``.
    ``root``: the folder holding the files (default ``default_dir(name)``; ignored by the
    data sets that need no files). ``settings``: the loader's keyword arguments
    (``settings_of(name)`` lists them); an unknown one is a DataError.
    """
    loader = _loader(name)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    _check_settings(name, settings)
    if name not in FOLDERS:
        return loader(split, **settings)
    return loader(Path(root) if root is not None else default_dir(name), split, **settings)


def dataset_info(name: str, **settings) -> DatasetInfo:
    """Sizes of data set ``name`` under ``settings`` without reading any data."""
    _loader(name)
    _check_settings(name, settings)
    if name in ("shd", "ssc"):
        defaults = settings_of(name)
        binning = Binning(*(settings.get(k, defaults[k]) for k in ("dt_ms", "steps", "group")))
        return heidelberg_info(name, binning)
    if name == "mackey-glass":
        window = settings.get("window", settings_of(name)["window"])
        return DatasetInfo(name, "regression", input_size=1, num_classes=None, steps=window)
    if name == "psmnist-mini":
        steps = mini_steps(settings.get("side", settings_of(name)["side"]))
        return DatasetInfo(name, "classification", input_size=1, num_classes=10, steps=steps)
    return _STATIC_INFO[name]

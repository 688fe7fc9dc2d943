"""The one way in: data sets by name, their settings, and where their files live."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from .core import SPLITS, DatasetInfo
from .errors import DataError
from .heidelberg import Binning, heidelberg_info, load_shd, load_ssc
from .mackey_glass import SIZE_SETTINGS, check_mackey_glass, load_mackey_glass
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
    """The folder holding one sub-folder per data set: ``$DELREC_DATA`` or ``./data`` (also
    where the variable is set but empty, which would name the current folder)."""
    return Path(os.environ.get("DELREC_DATA", "").strip() or "data")


def needs_files(name: str) -> bool:
    """Whether data set ``name`` is read from files (the others are generated or ship with
    a package, and take no data root)."""
    return name in FOLDERS


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


MAX_SEED = 2**63 - 1  # the largest seed numpy's and torch's generators both take
# the largest seed of a new run: torch's generators keep a seed's low 32 bits, so a larger one
# initialises, shuffles and drops out as seed mod 2**32 (runs written before stay usable)
MAX_RUN_SEED = 2**32 - 1


def is_seed(value) -> bool:
    """Whether ``value`` is a seed numpy's and torch's generators both take: a whole number
    (not a bool) in 0…MAX_SEED."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return whole and 0 <= value <= MAX_SEED


def _check_settings(name: str, settings: dict) -> None:
    """A DataError for an unknown setting, or a value not of its loader's annotated type."""
    accepted = settings_of(name)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise DataError(
            f"unknown setting(s) {', '.join(unknown)} for data set '{name}'; it "
            f"accepts: {', '.join(accepted) or 'none'}"
        )
    hints = typing.get_type_hints(_loader(name))
    for key, value in settings.items():
        if key in hints:
            _check_type(key, value, hints[key])


def _check_type(key: str, value, annotation) -> None:
    """A DataError unless ``value`` is of ``annotation`` (bool, int, float, str, path or an
    optional one); a ``*_seed`` must be a whole number in 0…MAX_SEED."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else ()
    if value is None and type(None) in options:
        return
    kinds = set(options or (annotation,)) - {type(None)}
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if bool in kinds:
        wanted, fits = "true or false", isinstance(value, bool)
    elif int in kinds:
        wanted, fits = "a positive integer", whole  # a loader checks the value
        if key.endswith("_seed"):
            wanted, fits = f"a whole number in 0…{MAX_SEED}", is_seed(value)
    elif float in kinds:
        wanted = "a finite number"
        fits = isinstance(value, numbers.Real) and not isinstance(value, bool)
        fits = fits and math.isfinite(value)
    elif str in kinds:
        wanted, fits = "a path (a string)", isinstance(value, (str, os.PathLike))
    else:
        return
    if not fits:
        suffix = " or null" if type(None) in options else ""
        raise DataError(f"{key}={value!r} must be {wanted}{suffix}")


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
    if not needs_files(name):
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
        sizes = {**settings_of(name), **settings}
        check_mackey_glass(**{key: sizes[key] for key in SIZE_SETTINGS})
        window = sizes["window"]
        return DatasetInfo(name, "regression", input_size=1, num_classes=None, steps=window)
    if name == "psmnist-mini":
        steps = mini_steps(settings.get("side", settings_of(name)["side"]))
        return DatasetInfo(name, "classification", input_size=1, num_classes=10, steps=steps)
    return _STATIC_INFO[name]

"""A run's configuration: the settings, how they resolve, and their validation.

A :class:`TrainConfig` is resolved in four layers, each overriding the one before:

1. the preset of the task and model (:func:`preset`: the task's recipe in
   :mod:`delrec.recipes` and the model variant's defaults);
2. a config file (TOML or JSON, same nesting as :meth:`TrainConfig.to_dict`);
3. ``--set key=value`` pairs (dotted keys for nested settings, values parsed as JSON and
   taken as plain strings when they are not JSON);
4. explicit command-line flags (``--epochs`` …).

Unknown keys and bad values raise :class:`ConfigError` naming the key and the fix, before any
data is loaded or any network is built. ``network`` holds every :class:`NetworkConfig` field
except the ones fixed by the task (``input_size``, ``output_size``) and the ``model``;
``data`` holds the keyword settings of :func:`delrec.data.load_dataset` (resolved with the
data set's defaults).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from delrec.data import DataError, dataset_info, settings_of
from delrec.data.registry import MAX_RUN_SEED, MAX_SEED, is_seed, needs_files
from delrec.delays import MAX_DELAY, parse_init
from delrec.models import MODELS, VARIANTS, NetworkConfig
from delrec.recipes import RECIPES


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message names the key and the fix."""


OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("onecycle", "cosine", "constant")
TASKS = tuple(RECIPES)  # one recipe per data set (checked by the tests)
NETWORK_FIXED_BY_TASK = ("input_size", "output_size", "model")


@dataclass
class OptimConfig:
    """Two optimizers of the same kind, each with its own schedule stepped once per epoch.

    ``lr``/``weight_decay``: the weights (weight decay on weight matrices only; biases and
    BatchNorm parameters get none). ``position_*``: recurrent delays, spread logits and
    feedforward positions. ``lr`` is the peak rate of a one-cycle schedule and the initial
    rate of a cosine one. ``grad_clip``:
    clip every weight gradient to ``[-grad_clip, grad_clip]`` (the vanilla RSNN needs it).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "onecycle"
    position_lr: float = 5e-2
    position_weight_decay: float = 0.0
    position_scheduler: str = "onecycle"
    grad_clip: float | None = None


@dataclass
class SpreadConfig:
    """Delay spread schedule (docs/design.md#spread-schedule-and-clamping):
    ``σ_e = sigma0 · gamma^(100 e / E)`` at the start of epoch ``e`` of ``E``, in time steps.
    ``gamma = 1`` keeps σ constant (no annealing)."""

    sigma0: float = 10.0
    gamma: float = 0.95


@dataclass
class TrainConfig:
    """Everything that defines a training run; see the module docstring for how it resolves.

    ``max_train_samples``: train on a seeded random subset of this many training items
    (``None``: all; with ``augment``, of the 3N augmented views). ``augment``: present the
    training split three times per epoch (original, time-shifted, same-class blend; SHD).
    ``standardize`` (regression): feed the network
    ``(x - m) / s`` and fit targets on the same scale, ``m``, ``s`` = mean and std of the
    training targets; metrics are reported in the data's own units. ``rate_penalty``: λ of
    the firing-rate penalty
    ``λ · mean over layers of 0.5 Σ s² / (T·B·N)``. ``tbptt``: truncated backpropagation through
    time in chunks of this many steps, the state carried across chunks (``None``: one pass over
    the whole sequence; docs/training.md#truncated-bptt). ``device``: ``"auto"`` (CUDA when
    available), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …; ``threads``: CPU threads for torch
    (``None``: torch's default; small networks run fastest on one, as their per-step operations
    are tiny);
    ``data_root``: folder of the data set's files.
    """

    task: str = "mackey-glass"
    model: str = "delrec"
    data: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    spread: SpreadConfig = field(default_factory=SpreadConfig)
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    max_train_samples: int | None = None
    augment: bool = False
    standardize: bool = False
    rate_penalty: float = 0.0
    tbptt: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    num_workers: int = 0
    data_root: str | None = None

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-able); ``from_dict`` of it gives an equal config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a complete nested dict (as written to ``config.json``), validated."""
        config = _build(cls, values, "")
        validate(config)
        return config

    def network_config(self, input_size: int, output_size: int) -> NetworkConfig:
        """The :class:`NetworkConfig` of this run for a data set's sizes."""
        return NetworkConfig(
            input_size=input_size, output_size=output_size, model=self.model, **self.network
        )


# settings a resumed run may change (where it runs, not what it computes)
RESUME_OVERRIDABLE = ("device", "data_root", "num_workers", "threads")


def comparable(values: dict) -> dict:
    """A stored config dict as two runs of the same settings share it: settings added since it
    was written at their defaults (an unreadable dict as it is), without
    :data:`RESUME_OVERRIDABLE`."""
    try:
        values = TrainConfig.from_dict(values).to_dict()
    except ConfigError:
        pass
    return {k: v for k, v in values.items() if k not in RESUME_OVERRIDABLE}


def flat_settings(values: dict, prefix: str = "") -> dict[str, str]:
    """``{"network.hidden_sizes": "[32]", …}``: a nested configuration, values as JSON."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.dumps(value)
    return flat


def differences(first: dict, second: dict, first_name: str, second_name: str) -> str:
    """Where two stored configurations differ (:func:`comparable`), setting by setting:
    ``"epochs: 4 in config.json, 2 in last.pt, …"``; ``""`` where they agree."""
    a, b = flat_settings(comparable(first)), flat_settings(comparable(second))
    return ", ".join(
        f"{key}: {a.get(key, 'nothing')} in {first_name}, {b.get(key, 'nothing')} in {second_name}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    )


# --------------------------------------------------------------------------- presets
def preset(task: str = "mackey-glass", model: str = "delrec") -> TrainConfig:
    """The recipe of ``task`` (:data:`delrec.recipes.RECIPES`) for ``model``, with the model
    variant's own defaults (:data:`delrec.models.VARIANTS`: the vanilla RSNN clips gradients)."""
    if task not in RECIPES:
        raise ConfigError(
            f"unknown task {task!r}{_suggest(task, RECIPES)}; choose one of {', '.join(RECIPES)}"
        )
    if model not in VARIANTS:
        raise ConfigError(
            f"unknown model {model!r}{_suggest(model, VARIANTS)}; choose one of {', '.join(MODELS)}"
        )
    values = {"task": task, "model": model, **copy.deepcopy(RECIPES[task])}
    grad_clip = VARIANTS[model].grad_clip
    if grad_clip is not None:
        values = _merge(values, {"optim": {"grad_clip": grad_clip}})
    return TrainConfig.from_dict(values)


# --------------------------------------------------------------------------- resolution
def resolve(
    task: str | None = None,
    model: str | None = None,
    file_values: dict | None = None,
    overrides: list[str] | None = None,
    flags: dict | None = None,
) -> TrainConfig:
    """Preset → config file values → ``--set`` overrides → flags, validated.

    ``task``/``model`` given here win over the ones in the file or overrides; ``flags`` maps
    top-level keys to values (``None`` values are ignored).
    """
    layered = given_settings(
        file_values, overrides, {**(flags or {}), "task": task, "model": model}
    )
    given = {name: layered.pop(name, None) for name in ("task", "model")}  # null: the default
    task = task or ("mackey-glass" if given["task"] is None else given["task"])
    model = model or ("delrec" if given["model"] is None else given["model"])
    for name, value in (("task", task), ("model", model)):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    base = preset(task, model).to_dict()
    config = _build(TrainConfig, _merge(base, layered), "")
    validate(config)
    check_new_seed(config.seed)
    return config


def check_new_seed(seed: int) -> None:
    """A ConfigError for the seed of a new run beyond :data:`MAX_RUN_SEED`, which torch's
    generators would read as ``seed mod 2**32`` (a run written before with one stays usable)."""
    if seed > MAX_RUN_SEED:
        raise ConfigError(
            f"seed {seed} is beyond {MAX_RUN_SEED}: torch's generators keep a seed's low 32 "
            f"bits, so the run would initialise, shuffle and drop out as seed "
            f"{seed % 2**32}; give a seed in 0…{MAX_RUN_SEED}"
        )


def given_settings(
    file_values: dict | None = None,
    overrides: list[str] | None = None,
    flags: dict | None = None,
) -> dict:
    """The settings a user gave (nested, as :func:`resolve` layers them over the preset). A
    flag (a top-level setting of the command line) and a ``--set`` of the same key with
    another value are a ConfigError: the flag would win and the other value go unchecked."""
    layered = _merge({}, file_values or {})
    set_here = {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(layered, key, value)
        set_here[key] = value
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key in set_here and set_here[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{key} is given twice, {flag} {value} and --set {key}={set_here[key]}: give "
                "it once"
            )
        layered[key] = value
    return layered


def ignored_settings(config: TrainConfig, given: dict) -> list[str]:
    """The settings of ``given`` (:func:`given_settings`) that ``config.model`` does not use,
    each as ``"section.key=value"``: accepted and recorded in ``config.json`` as given (a
    preset's own values apply to every model), they would otherwise look applied."""
    variant = VARIANTS[config.model]
    sections = {name: given.get(name) or {} for name in ("network", "optim", "spread")}
    network = sections["network"]
    no_delays, no_recurrence = not variant.learns_recurrent_delays, not variant.recurrent
    no_positions = not variant.learns_delays
    rules = [
        ("network", "learn_spread", no_delays and network.get("learn_spread") is True),
        ("network", "delay_type", not variant.recurrent_delays),
        ("network", "delay_init", not variant.recurrent_delays),
        (
            "network",
            "recurrent_dropout",
            no_recurrence and network.get("recurrent_dropout"),
        ),
        ("network", "ff_delay_window", not variant.feedforward_delays),
        ("optim", "position_lr", no_positions),
        ("optim", "position_weight_decay", no_positions),
        ("optim", "position_scheduler", no_positions),
        *(("spread", key, no_delays) for key in sections["spread"]),
    ]
    ignored = [
        f"{section}.{key}={sections[section][key]!r}"
        for section, key, unused in rules
        if unused and key in sections[section]
    ]
    forced = variant.delay_type
    if forced is not None and network.get("delay_type", forced) != forced:
        ignored.append(f"network.delay_type={network['delay_type']!r} (its delays are {forced})")
    return ignored


def ignored_notes(config: TrainConfig, given: dict) -> list[str]:
    """The line ``delrec train`` and ``delrec sweep`` print for each of
    :func:`ignored_settings`, and for a data root given for a data set that reads no files."""
    notes = [
        f"note: {setting} does nothing for the {config.model} model; config.json records it "
        "as given"
        for setting in ignored_settings(config, given)
    ]
    if "data_root" in given and config.data_root is not None and not needs_files(config.task):
        notes.append(
            f"note: data_root={config.data_root!r} (--data-root) does nothing for "
            f"{config.task}, whose data is generated or ships with delrec's dependencies: "
            "no files are read"
        )
    return notes


def load_config_file(path: str | Path) -> dict:
    """Nested settings from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a .toml or .json file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # the same parser, as a package (a dependency there)
                import tomli as tomllib
            # utf-8-sig: a byte-order mark (Windows editors write one) is not a TOML statement
            values = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        elif path.suffix == ".json":
            text = path.read_text(encoding="utf-8-sig")
            values = json.loads(text, object_pairs_hook=_without_repeated_keys)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json")
    except RecursionError:
        raise ConfigError(
            f"config file {path} cannot be parsed: its lists or tables are nested too deeply"
        ) from None
    except (ValueError, OSError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"config file {path} cannot be parsed: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    if isinstance(values.get("config"), dict):  # a run's config.json: its settings one level down
        raise ConfigError(
            f'{path} is a run\'s own file, whose settings are under "config": continue that '
            f"run with `delrec train --resume {path.parent}`, or train it again from a .json "
            "file holding just that object"
        )
    return values


def _without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a ValueError naming a key given twice (JSON keeps the
    last one without a word, TOML refuses it)."""
    values = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"the key {key!r} is given twice in one object")
        values[key] = value
    return values


def parse_override(item: str) -> tuple[str, object]:
    """``"optim.lr=1e-3"`` → ``("optim.lr", 0.001)``: the value is JSON when it parses as
    JSON (numbers, true/false, null, lists), else the plain string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-3), got {item!r}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    except ValueError:
        value = text
    return key, value


def _set_dotted(target: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        target = child
    target[leaf] = value


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict update: sections merge, values replace."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- typing
def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, values: dict, prefix: str):
    """Instance of dataclass ``cls`` from ``values``, every value checked against its type."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a section of settings, got {values!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown setting '{prefix}{key}'{_suggest(key, names)}; "
                f"valid keys: {', '.join(prefix + n for n in names)}"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _coerce(value, annotation, key: str):
    """``value`` converted to ``annotation`` (a dataclass, dict, tuple, scalar or Optional)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return _build(annotation, value, key + ".")
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section of settings, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, e.g. [64, 64], got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {annotation}")


# --------------------------------------------------------------------------- validation
MAX_COUNT = 2**31 - 1  # epochs and batch sizes: more than any machine holds or runs
MAX_THREADS = 1024  # threads and loader workers: more than any machine has cores (torch
# segfaults when it cannot start the threads asked for; a loader forks every worker)
AUGMENTABLE = ("shd", "ssc")  # spike counts: augment.py shifts and thins counts


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for any value training cannot use (no data is read)."""
    _check(config.task in TASKS, f"unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
    _check(
        config.model in MODELS, f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}"
    )
    for name in ("epochs", "batch_size", "eval_batch_size"):
        value = getattr(config, name)
        _check(1 <= value <= MAX_COUNT, f"{name} must be in 1…{MAX_COUNT}, got {value}")
    _check(
        config.max_train_samples is None or config.max_train_samples >= 1,
        f"max_train_samples must be >= 1 or null, got {config.max_train_samples}",
    )
    _check(
        0 <= config.num_workers <= MAX_THREADS,
        f"num_workers must be in 0…{MAX_THREADS}, got {config.num_workers}",
    )
    _check(
        config.threads is None or 1 <= config.threads <= MAX_THREADS,
        f"threads must be in 1…{MAX_THREADS} or null, got {config.threads}",
    )
    _check(
        config.data_root is None or config.data_root.strip() != "",
        "data_root must name a folder or be null, got an empty string",
    )
    _check(config.rate_penalty >= 0, f"rate_penalty must be >= 0, got {config.rate_penalty}")
    _check(
        config.tbptt is None or config.tbptt >= 1,
        f"tbptt must be a chunk length >= 1 step or null, got {config.tbptt}",
    )
    _check(is_seed(config.seed), f"seed must be in 0…{MAX_SEED}, got {config.seed}")
    check_device(config.device)

    optim = config.optim
    _check(
        optim.optimizer in OPTIMIZERS,
        f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optim.optimizer!r}",
    )
    for name in ("scheduler", "position_scheduler"):
        _check(
            getattr(optim, name) in SCHEDULERS,
            f"optim.{name} must be one of {', '.join(SCHEDULERS)}, got {getattr(optim, name)!r}",
        )
    for name in ("lr", "position_lr"):
        _check(getattr(optim, name) > 0, f"optim.{name} must be > 0, got {getattr(optim, name)}")
    for name in ("weight_decay", "position_weight_decay"):
        _check(getattr(optim, name) >= 0, f"optim.{name} must be >= 0, got {getattr(optim, name)}")
    _check(
        optim.grad_clip is None or optim.grad_clip > 0,
        f"optim.grad_clip must be > 0 or null, got {optim.grad_clip}",
    )

    spread = config.spread
    _check(
        0 <= spread.sigma0 <= MAX_DELAY,
        f"spread.sigma0 must be between 0 and {MAX_DELAY:g} steps, got {spread.sigma0}",
    )
    _check(0 < spread.gamma <= 1, f"spread.gamma must be in (0, 1], got {spread.gamma}")

    _validate_network(config)
    try:
        info = dataset_info(config.task, **config.data)
    except (DataError, TypeError) as error:
        raise ConfigError(f"data: {error}") from None
    config.data = {**settings_of(config.task), **config.data}
    _check(
        not config.augment or config.task in AUGMENTABLE,
        f"augment shifts and thins spike counts, so it applies to {' and '.join(AUGMENTABLE)} "
        f"only, not {config.task!r}; set augment=false",
    )
    _check(
        not config.standardize or info.task == "regression",
        f"standardize applies to regression data sets only, not {config.task!r}",
    )
    _check(
        info.task == "classification" or (config.max_train_samples or 2) >= 2,
        f"max_train_samples = 1 leaves regression ({config.task}) one training item, whose "
        "targets have no variance to normalise the NMSE by (it would read nan); give 2 or more",
    )
    readout = config.network.get("readout")
    _check(
        info.task == "classification" or readout == "ema",
        f"regression ({config.task}) needs network.readout = 'ema', got {readout!r}",
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(device: str) -> None:
    """A ConfigError unless ``device`` is ``auto`` or a torch device this machine has."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from None
    if parsed.type == "cuda":
        _check(
            torch.cuda.is_available(),
            f"device {device!r}: CUDA is not available here; use --device cpu (or auto)",
        )
        _check(
            parsed.index is None or parsed.index < torch.cuda.device_count(),
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)",
        )
    else:
        _check(
            parsed.type == "cpu", f"device {device!r} is not supported; use auto, cpu or cuda[:N]"
        )


def _validate_network(config: TrainConfig) -> None:
    network = config.network
    fields = {f.name for f in dataclasses.fields(NetworkConfig)} - set(NETWORK_FIXED_BY_TASK)
    for key in network:
        if key in NETWORK_FIXED_BY_TASK:
            raise ConfigError(f"network.{key} is set by the task and --model, not by the config")
        if key not in fields:
            raise ConfigError(
                f"unknown setting 'network.{key}'{_suggest(key, fields)}; valid "
                f"keys: {', '.join('network.' + k for k in sorted(fields))}"
            )
    init = network.get("delay_init")
    if isinstance(init, (int, float)) and not isinstance(init, bool):  # a constant delay
        network = {**network, "delay_init": f"constant:{init}"}
    hints = typing.get_type_hints(NetworkConfig)
    typed = {key: _coerce(value, hints[key], f"network.{key}") for key, value in network.items()}
    try:
        built = NetworkConfig(input_size=1, output_size=1, model=config.model, **typed)
        built.neuron.build()
        parse_init(built.delay_init)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"network: {error}") from None
    config.network = {
        k: v for k, v in dataclasses.asdict(built).items() if k not in NETWORK_FIXED_BY_TASK
    }


__all__ = [
    "ConfigError",
    "RESUME_OVERRIDABLE",
    "OptimConfig",
    "SpreadConfig",
    "TrainConfig",
    "TASKS",
    "comparable",
    "preset",
    "resolve",
    "resolve_device",
    "load_config_file",
    "parse_override",
    "validate",
]

"""`delrec compare RUN_DIR…`: trained runs side by side, in the layout of Table S5.

Each RUN_DIR is a run written by ``delrec train`` (``config.json``, ``test_results.json``)
or a multi-seed run (``seeds.json`` and one ``seed-<s>/`` run per seed). Runs whose resolved
configurations are equal apart from the seed (and where they ran) form one row:

* test metric with the trained real-valued delays (recurrent delays with the spread σ of the
  best checkpoint, feedforward positions between their two taps), re-evaluated as
  ``delrec eval --spread`` does; equal to the rounded one for models without learned delays,
  mean ± std (population) over seeds;
* the same with integer (rounded) delays, as a chip runs them (``test_results.json``);
* the cost of rounding: the loss of test metric from real-valued to integer delays, per seed
  (accuracy points lost, or NMSE gained), mean ± std (``–`` where nothing was re-evaluated:
  models without learned delays, or ``--rounded-only``, where the real-valued metric of a
  model that learns delays is ``–`` too, an empty cell in the CSV);
* trainable parameters of the network (``count_parameters``);
* mean firing rate (spikes per neuron per step, over hidden layers) of the training epoch
  that gave the best checkpoint (``metrics.csv``).

Rows are ranked worst to best, as in Table S5.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from delrec import files
from delrec.config import differences, flat_settings, preset
from delrec.models import VARIANTS, count_parameters
from delrec.runs import METRICS, RESULTS, RunDir, RunError, load_trained
from delrec.training.evaluation import evaluate_run
from delrec.training.objectives import rounding_cost

# settings that do not change what a run computes, or that tell seeds apart
NOT_GROUPING = ("seed", "device", "threads", "num_workers", "data_root", "eval_batch_size")


class CompareError(Exception):
    """Runs that cannot be compared with each other; the message says what to do."""


@dataclass
class SeedRun:
    """One finished run (one seed): its configuration and what was measured."""

    run_dir: Path
    config: dict
    metric: str  # "accuracy" or "nmse"
    rounded: float  # test metric with integer delays
    real: float  # test metric with real-valued delays and the training spread
    parameters: int
    firing_rate: float | None
    reevaluated: bool = False  # ``real`` measured with real-valued delays (else = rounded)

    @property
    def rounding_cost(self) -> float:
        """Test metric lost by rounding the delays (accuracy points, or NMSE gained)."""
        return rounding_cost(self.metric, self.real, self.rounded)


@dataclass
class Row:
    """Runs of one configuration (several seeds)."""

    label: str
    runs: list[SeedRun]
    shown: tuple[str, ...] = ()  # the settings its label names (they tell the model's rows apart)

    @property
    def model(self) -> str:
        return self.runs[0].config["model"]

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    def stats(self, field: str) -> tuple[float, float]:
        """Mean and population std over seeds of ``"real"``, ``"rounded"`` or
        ``"rounding_cost"``."""
        values = [getattr(run, field) for run in self.runs]
        return statistics.fmean(values), statistics.pstdev(values)

    @property
    def parameters(self) -> int:
        return self.runs[0].parameters

    @property
    def reevaluated(self) -> bool:
        return all(run.reevaluated for run in self.runs)

    @property
    def real_known(self) -> bool:
        """Whether the real-valued-delay metric was measured: re-evaluated, or equal to the
        rounded one (a model that learns no delays); not under ``--rounded-only``."""
        return self.reevaluated or not VARIANTS[self.model].learns_delays

    @property
    def firing_rate(self) -> float | None:
        """The mean over seeds; ``None`` unless every seed recorded one."""
        rates = [run.firing_rate for run in self.runs]
        return None if None in rates else statistics.fmean(rates)


# --------------------------------------------------------------------------- reading
def find_runs(paths: list[Path]) -> list[Path]:
    """The single-seed run directories named by ``paths`` (multi-seed runs expanded)."""
    return [run.path for path in paths for run in RunDir(path).single_runs()]


def read_run(
    run_dir: Path, real_delays: bool = True, device: str = "auto", data_root: str | None = None
) -> SeedRun:
    """Read one finished run; ``real_delays`` re-evaluates it with real-valued delays (on
    ``device``, from the data in ``data_root`` when the data set's files moved)."""
    run = RunDir(run_dir)
    results = run.read_results()
    config = run.config_values()
    metric = "accuracy" if "accuracy" in results else "nmse"
    real = results[metric]
    reevaluated = real_delays and VARIANTS[config["model"]].learns_delays
    if reevaluated:
        real = evaluate_run(run_dir, split="test", spread=True, device=device, data_root=data_root)[
            metric
        ]
    payload, network = load_trained(run_dir)
    _check_same_config(run_dir, config, payload)
    return SeedRun(
        run_dir,
        config,
        metric,
        results[metric],
        real,
        count_parameters(network),
        _firing_rate(run, results.get("best_epoch")),
        reevaluated,
    )


def _check_same_config(run_dir: Path, config: dict, payload: dict) -> None:
    """A RunError unless ``config.json``'s settings are those the best checkpoint was trained
    with (a row would show one run under another's settings)."""
    if "train_config" not in payload:
        return
    differ = differences(config, payload["train_config"], "config.json", "the checkpoint")
    if differ:
        raise RunError(
            f"{run_dir / 'config.json'} does not describe the network its best checkpoint "
            f"holds ({differ}): it was edited; restore it, or leave the run out"
        )


def _firing_rate(run: RunDir, epoch: int | None) -> float | None:
    """The firing rate of ``epoch`` in the run's ``metrics.csv``; ``None`` where the run
    records none (written before delrec recorded it); a RunError where the file has no row for
    ``epoch`` or a value that is not a number."""
    if epoch is None:
        return None
    for line, row in enumerate(run.read_metrics(), start=2):
        if run.metrics_number(line, row, "epoch") == epoch:
            return run.metrics_number(line, row, "firing_rate") if row.get("firing_rate") else None
    raise RunError(
        f"{run.path / METRICS} has no row for epoch {epoch}, the best epoch in {RESULTS}: it "
        "was edited, cut short or removed; restore it, or leave the run out"
    )


def _setting_items(config: dict) -> dict:
    """Flat ``{"network.hidden_sizes": value, …}`` of a configuration, minus NOT_GROUPING."""
    return {key: value for key, value in flat_settings(config).items() if key not in NOT_GROUPING}


def group_runs(runs: list[SeedRun]) -> list[Row]:
    """One row per configuration, labelled with the model and the settings that tell its rows
    apart from the model's other rows; ranked worst to best."""
    groups: dict[str, list[SeedRun]] = {}
    for run in runs:
        key = json.dumps(_setting_items(run.config), sort_keys=True)
        twin = next(
            (r for r in groups.get(key, []) if r.config["seed"] == run.config["seed"]), None
        )
        if twin is not None:
            raise CompareError(
                f"{twin.run_dir} and {run.run_dir} are one configuration with one seed "
                f"({run.config['seed']}): a row would count it twice as two seeds; name each "
                "run once"
            )
        groups.setdefault(key, []).append(run)
    rows = []
    for members in groups.values():
        model = members[0].config["model"]
        siblings = [
            _setting_items(g[0].config) for g in groups.values() if g[0].config["model"] == model
        ]
        mine = _setting_items(members[0].config)
        varying = [k for k in mine if any(s.get(k) != mine[k] for s in siblings)]
        label = VARIANTS[model].label
        if varying:
            label += " (" + ", ".join(f"{k.split('.')[-1]}={mine[k]}" for k in varying) + ")"
        rows.append(Row(label, members, tuple(varying)))
    better_is_lower = rows and rows[0].metric == "nmse"
    return sorted(rows, key=lambda row: row.stats("rounded")[0], reverse=bool(better_is_lower))


def unlabelled_differences(rows: list[Row]) -> list[str]:
    """The settings in which the rows differ beyond their models and their labels, each as
    ``'optim.scheduler: "cosine" in A, B; "onecycle" in C'``: a setting some row changed from
    its model's preset for the task (:func:`delrec.config.preset`; a preset's own differences
    between models are part of the models) in which a row whose label does not show it differs
    from another row. The ranking then compares those settings too."""
    values, changed = [], set()
    for row in rows:
        config = row.runs[0].config
        mine = _setting_items(config)
        base = _setting_items(preset(config["task"], config["model"]).to_dict())
        changed |= {key for key, value in mine.items() if base.get(key) != value}
        values.append(mine)
    notes = []
    for key in sorted(changed):
        seen: dict[str, list[str]] = {}
        for row, mine in zip(rows, values):
            seen.setdefault(mine.get(key, "nothing"), []).append(row.label)  # JSON text
        unlabelled = {
            mine.get(key, "nothing") for row, mine in zip(rows, values) if key not in row.shown
        }
        if len(seen) > 1 and unlabelled:
            notes.append(
                f"{key}: "
                + "; ".join(f"{value} in {', '.join(labels)}" for value, labels in seen.items())
            )
    return notes


def compare(
    paths: list[Path], real_delays: bool = True, device: str = "auto", data_root: str | None = None
) -> list[Row]:
    """Rows for the runs in ``paths`` (see the module docstring); ``device`` and ``data_root``
    as in :func:`read_run`."""
    found = find_runs(paths)
    resolved = [path.resolve() for path in found]
    twice = next((p for i, p in enumerate(found) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise CompareError(f"{twice} is named twice (directly or inside a folder of seeds)")
    for path in found:  # before any work: every run finished, and all of one task
        RunDir(path).read_results()
    tasks = {RunDir(path).config_values()["task"]: path for path in found}
    if len(tasks) > 1:
        named = ", ".join(f"{task} ({path})" for task, path in tasks.items())
        raise CompareError(
            f"the runs are of several tasks: {named}; a table ranks the models of one task, "
            "so compare one task at a time"
        )
    return group_runs([read_run(path, real_delays, device, data_root) for path in found])


# --------------------------------------------------------------------------- output
def format_parameters(count: int) -> str:
    """Table S5 style: ``37.5k``, ``0.17M``."""
    if count >= 100_000:
        return f"{count / 1e6:.2g}M"
    if count >= 1_000:
        return f"{count / 1e3:.3g}k"
    return str(count)


def _format_metric(row: Row, field: str) -> str:
    if (field == "rounding_cost" and not row.reevaluated) or (
        field == "real" and not row.real_known
    ):
        return "–"
    mean, std = row.stats(field)
    if row.metric == "accuracy":
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.4g} ± {std:.2g}"


def format_markdown(rows: list[Row]) -> str:
    """The Table S5 layout, with the rounded-delay metric, the cost of rounding and the firing
    rate added."""
    name = "Acc. [%]" if rows and rows[0].metric == "accuracy" else "NMSE"
    header = [
        "Model",
        "Rec.",
        "Rec. Delays",
        "Ff. Delays",
        "LIF",
        "Param",
        "Seeds",
        f"Test {name}",
        f"Rounded-delay {name}",
        "Rounding cost",
        "Firing rate",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        variant = VARIANTS[row.model]
        traits = (variant.recurrent, variant.recurrent_delays, variant.feedforward_delays)
        rate = f"{row.firing_rate:.4f}" if row.firing_rate is not None else "–"
        cells = [
            row.label,
            *("✓" if t else "" for t in traits),
            "✓",
            format_parameters(row.parameters),
            str(len(row.runs)),
            _format_metric(row, "real"),
            _format_metric(row, "rounded"),
            _format_metric(row, "rounding_cost"),
            rate,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_as_records(rows: list[Row]) -> list[dict]:
    """CSV-ready records, one per row."""
    records = []
    for row in rows:
        variant = VARIANTS[row.model]
        (real, real_std), (rounded, rounded_std) = row.stats("real"), row.stats("rounded")
        records.append(
            {
                "label": row.label,
                "task": row.runs[0].config["task"],
                "model": row.model,
                "recurrent": variant.recurrent,
                "recurrent_delays": variant.recurrent_delays,
                "feedforward_delays": variant.feedforward_delays,
                "parameters": row.parameters,
                "seeds": len(row.runs),
                f"{row.metric}_mean": real if row.real_known else None,
                f"{row.metric}_std": real_std if row.real_known else None,
                f"rounded_{row.metric}_mean": rounded,
                f"rounded_{row.metric}_std": rounded_std,
                "rounding_cost_mean": row.stats("rounding_cost")[0] if row.reevaluated else None,
                "rounding_cost_std": row.stats("rounding_cost")[1] if row.reevaluated else None,
                "firing_rate": row.firing_rate,
                "run_dirs": ";".join(str(run.run_dir) for run in row.runs),
            }
        )
    return records


X_AXES = {
    "parameters": "trainable parameters",
    "firing-rate": "mean firing rate (spikes/neuron/step)",
}


def plot_rows(rows: list[Row], path: Path, x: str = "parameters") -> None:
    """Metric (rounded delays: filled, mean ± std; real-valued: hollow) against ``x``
    (``"parameters"`` or ``"firing-rate"``), one line per model."""
    plt = files.pyplot()

    scale = 100.0 if rows and rows[0].metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(row.model for row in rows):
        mine = [
            r for r in rows if r.model == model and (x == "parameters" or r.firing_rate is not None)
        ]
        mine.sort(key=lambda r: r.parameters if x == "parameters" else r.firing_rate)
        if not mine:
            continue
        xs = [r.parameters if x == "parameters" else r.firing_rate for r in mine]
        rounded = [[v * scale for v in r.stats("rounded")] for r in mine]
        line = ax.errorbar(
            xs,
            [m for m, _ in rounded],
            yerr=[s for _, s in rounded],
            marker="o",
            capsize=3,
            label=VARIANTS[model].label,
        )
        known = [(x_value, r) for x_value, r in zip(xs, mine) if r.real_known]
        ax.scatter(
            [x_value for x_value, _ in known],
            [r.stats("real")[0] * scale for _, r in known],
            facecolors="none",
            edgecolors=line[0].get_color(),
            zorder=3,
        )
        for x_value, row, (m, _) in zip(xs, mine, rounded):
            if row.label != VARIANTS[model].label:
                ax.annotate(
                    row.label.split("(", 1)[-1].rstrip(")"),
                    (x_value, m),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
    if x == "parameters":
        ax.set_xscale("log")
    metric = "test accuracy [%]" if scale == 100.0 else "test NMSE"
    ax.set(
        xlabel=X_AXES[x],
        ylabel=metric,
        title="filled: rounded delays (mean ± std over seeds); hollow: real-valued",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.write_figure(path, fig)
    plt.close(fig)


def write_outputs(
    rows: list[Row],
    markdown: Path | None,
    table_csv: Path | None,
    figure: Path | None,
    x: str = "parameters",
) -> None:
    """Write whichever of the Markdown table, CSV table and figure are given a path."""
    if markdown is not None:
        files.write_text(markdown, format_markdown(rows) + "\n")
    if table_csv is not None:
        records = rows_as_records(rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        files.write_text(table_csv, buffer.getvalue())
    if figure is not None:
        plot_rows(rows, figure, x)

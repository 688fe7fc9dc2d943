"""Figures of a run (PNG, matplotlib's Agg backend, no display needed), each written whole."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from delrec.files import pyplot, write_figure

plt = pyplot()


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    plt.close(fig)


def learning_curves(history: list[dict], metric: str, path: Path) -> None:
    """Train and validation loss and ``metric`` against the epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", metric)):
        values = {split: [row[f"{split}_{key}"] for row in history] for split in ("train", "valid")}
        for split, curve in values.items():
            ax.plot(epochs, curve, marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if key in ("loss", "nmse") and min(min(v) for v in values.values()) > 0:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, path)


def delay_histograms(start: dict[str, Tensor], end: dict[str, Tensor], path: Path) -> None:
    """One panel per delay layer: histogram of its delays (steps) at the start and the end."""
    names = list(end)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        first, last = start[name].flatten().float(), end[name].flatten().float()
        top = max(float(first.max()), float(last.max()), 1.0)
        bins = min(60, max(10, math.ceil(top) + 1))
        ax.hist(first.numpy(), bins=bins, range=(0, top), alpha=0.5, label="start")
        ax.hist(last.numpy(), bins=bins, range=(0, top), alpha=0.5, label="end")
        ax.set_title(f"delays {name}")
        ax.set_xlabel("delay (time steps)")
        ax.set_ylabel("count")
        ax.legend()
    _save(fig, path)


def spike_raster(spikes: list[Tensor], path: Path) -> None:
    """Spikes of one sample, one panel per hidden layer; each tensor is ``(T, N)``."""
    fig, axes = plt.subplots(
        len(spikes), 1, figsize=(9, 2.2 * len(spikes) + 0.5), squeeze=False, sharex=True
    )
    for index, (ax, layer) in enumerate(zip(axes[:, 0], spikes)):
        steps, neurons = layer.nonzero(as_tuple=True)
        ax.scatter(steps.numpy(), neurons.numpy(), s=1.5, marker="|", color="black")
        ax.set_xlim(0, layer.shape[0])
        ax.set_ylim(-0.5, layer.shape[1] - 0.5)
        ax.set_ylabel(f"layer {index}\nneuron")
        ax.set_title(f"layer {index}: {float(layer.mean()):.3f} spikes / neuron / step", fontsize=9)
    axes[-1, 0].set_xlabel("time step")
    _save(fig, path)


def prediction(targets: Tensor, predictions: Tensor, metrics: dict, path: Path) -> None:
    """The true test series against the prediction, item by item (items are in time order)."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(targets.numpy(), label="true", linewidth=1.2)
    ax.plot(predictions.numpy(), label="predicted", linewidth=1.0, alpha=0.85)
    ax.set_xlabel("test item (time step of the target)")
    ax.set_ylabel("x(t + H)")
    ax.set_title(f"test NMSE {metrics['nmse']:.4g}, R² {metrics['r2']:.4f} (integer delays)")
    ax.legend()
    _save(fig, path)


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
MAX_MARKERS = 12  # per line: a long run's markers stay sparse enough to read its line


def _layer_name(name: str) -> str:
    return f"layer {name}" if name.isdigit() else name


def _layer_columns(rows: list[dict], prefix: str) -> list[tuple[str, str]]:
    """``(column, layer name)`` of each column of ``rows`` named ``<prefix><layer>``."""
    columns = rows[0] if rows else ()
    return [(c, c.removeprefix(prefix)) for c in columns if c.startswith(prefix)]


def _layer_styles(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """``{linestyle, marker}`` of each layer that any run names (``firing_rate_<layer>``,
    ``grad_norm_<layer>``), hidden layers in depth order, then the readout: the same in every
    run and panel; no two alike up to 20 layers, no two markers alike (all that a run of one
    epoch shows) up to 10."""
    names = {
        name
        for rows in runs.values()
        for prefix in ("firing_rate_", "grad_norm_")
        for _, name in _layer_columns(rows, prefix)
    }
    depth_order = sorted(names, key=lambda name: (not name.isdigit(), name.zfill(20)))  # 2 < 10
    return {
        name: {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}
        for i, name in enumerate(depth_order)
    }


def training_dynamics(runs: dict[str, list[dict]], metric: str, path: Path) -> Figure:
    """How one or more runs trained, epoch by epoch (``runs``: label → the rows of its
    ``metrics.csv``): validation ``metric``, training loss, the firing rate of each hidden
    layer and the gradient norm of each layer (``firing_rate_<i>``, ``grad_norm_<layer>``;
    rows without them leave those panels empty). One colour per run, named in the legend of the
    validation panel; one line style and marker per layer, the same in every run, named in the
    legends of the layer panels. Returns the figure, written to ``path`` and closed."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (valid_ax, loss_ax), (rate_ax, grad_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layer_styles = _layer_styles(runs)
    for index, (label, rows) in enumerate(runs.items()):
        epochs = [int(float(row["epoch"])) for row in rows]  # "2.0" is epoch 2 too
        run_style = {
            "color": colors[index % len(colors)],
            "markevery": max(1, len(epochs) // MAX_MARKERS),
            "markersize": 4,
        }
        valid = [float(r[f"valid_{metric}"]) for r in rows]
        valid_ax.plot(epochs, valid, marker=".", label=label, **run_style)
        loss_ax.plot(epochs, [float(r["train_loss"]) for r in rows], marker=".", **run_style)
        for ax, prefix in ((rate_ax, "firing_rate_"), (grad_ax, "grad_norm_")):
            for column, name in _layer_columns(rows, prefix):
                values = [float(r[column]) for r in rows]
                ax.plot(epochs, values, **run_style, **layer_styles[name])
    valid_ax.set(ylabel=f"valid {metric}")
    loss_ax.set(ylabel="train loss", yscale="log")
    rate_ax.set_ylabel("firing rate (spikes / neuron / step)")
    rate_ax.set_yscale("symlog", linthresh=1e-4)  # silent layers (rate 0) stay visible
    grad_ax.set_ylabel("gradient norm (weights and biases)")
    grad_ax.set_yscale("symlog", linthresh=1e-8)  # layers without gradient (0) stay visible
    for ax, title in zip(
        axes.flat,
        ("validation", "training loss", "firing rate per hidden layer", "gradient norm per layer"),
    ):
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    if runs:
        valid_ax.legend(fontsize=7, title="run (colour)", title_fontsize=7)
    for ax, prefix in ((rate_ax, "firing_rate_"), (grad_ax, "grad_norm_")):
        drawn = {name for rows in runs.values() for _, name in _layer_columns(rows, prefix)}
        handles = [
            Line2D([], [], color="0.3", label=_layer_name(name), **style)
            for name, style in layer_styles.items()
            if name in drawn
        ]
        if handles:
            ax.legend(handles=handles, fontsize=7, title="layer (style, marker)", title_fontsize=7)
    _save(fig, path)
    return fig

"""Hardware report: what a chip needs to run a trained network with integer delays.

Per layer: neurons, synapses, the integer delay histogram and maximum, the delay-buffer
memory for axonal versus synaptic storage, and (over a data set) spikes and synaptic
operations per inference; the accuracy cost of rounding the delays.

Conventions. A delay ``d`` is counted in steps beyond the minimum: a recurrent spike arrives
``1 + d`` steps after emission (the one step is the loop's own latency, present without
delays), a feedforward-delay synapse delivers ``d`` steps later. Memory formulas, per delay
projection with ``N_pre`` presynaptic neurons, delays ``d`` and maximum ``D``:

* axonal storage — one ring of the last ``D`` spikes per presynaptic neuron, which every
  synapse taps at its own delay: ``N_pre × D`` bits;
* synaptic storage — one shift register of ``d`` spike bits per synapse: ``Σ_synapses d`` bits
  (for axonal delays ``N_post × Σ_j d_j``);
* delay values — ``values × ceil(log2(D + 1))`` bits (``N`` values axonal, ``N²`` synaptic,
  1 shared, ``O × I`` feedforward).

``neurons_with_mixed_delays`` counts the presynaptic neurons whose synapses (non-zero weights)
do not all share one delay: 0 means the projection runs as per-neuron (axonal) delays. The
report checks every integer delay against the network's ``max_delay`` and, when asked, against
a chip's published limits (:mod:`delrec.deploy.targets`).

Synaptic operations (an energy proxy): every non-zero input of a layer (a spike, or a
non-zero input frame entry for the first layer) costs one operation per non-zero outgoing
weight; recurrent spikes likewise. Counts are per inference (per sample), over the true
length of each sample when the loader gives lengths. Scores follow ``delrec eval``:
:func:`~delrec.models.readout_reduce` over each sample's true steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from delrec import files
from delrec.deploy.streaming import DelayedSynapses, StreamingNetwork
from delrec.deploy.targets import (
    Target,
    bits_for,
    format_max_delay_check,
    format_target_check,
    get_target,
    max_delay_check,
    target_check,
)
from delrec.layers import DelRec, FeedforwardDelay, rounding_layers
from delrec.training.objectives import Classification, Regression, make_objective, rounding_cost


# --------------------------------------------------------------------------- static part
def _delay_stats(kind: str, synapses: DelayedSynapses) -> dict:
    """Histogram and memory of one delay projection (see the module docstring), over the
    synapses a chip keeps: those of non-zero weight (a pruned synapse's delay counts nowhere)."""
    lags = synapses.lags
    used = synapses.weight != 0  # (O, I): a chip drops the zero-weight synapses
    if kind in ("axonal", "shared"):
        values = synapses.column_lags[used.any(0)]
        values = values[:1] if kind == "shared" else values
    else:
        values = lags[used]
    max_delay = int(values.max()) if values.numel() else 0
    counts = torch.bincount(values, minlength=max_delay + 1)
    highest = lags.masked_fill(~used, -1).amax(0)
    lowest = lags.masked_fill(~used, max_delay + 1).amin(0)
    return {
        "kind": kind,
        "values": int(values.numel()),
        "histogram": {str(d): int(c) for d, c in enumerate(counts.tolist()) if c},
        "max": max_delay,
        "mean": float(values.double().mean()) if values.numel() else 0.0,
        "axonal_buffer_bits": synapses.in_features * max_delay,
        "synaptic_buffer_bits": int(lags[used].sum()),
        "delay_value_bits": int(values.numel()) * bits_for(max_delay),
        "neurons_with_mixed_delays": int(((highest >= 0) & (highest != lowest)).sum()),
    }


def _static_layers(net: nn.Module, stream: StreamingNetwork) -> list[dict]:
    layers = []
    for index, (block, layer) in enumerate(zip(net.blocks, stream.layers)):
        entry = {
            "name": f"layer{index}",
            "neurons": layer.size,
            "neuron_model": type(layer.neuron).__name__,
            "feedforward_synapses": int(layer.synapses.weight.numel()),
            "recurrent_synapses": 0,
            "delays": [],
        }
        if isinstance(block.synapses, FeedforwardDelay):
            entry["delays"].append(_delay_stats("feedforward", layer.synapses))
        if isinstance(block.neurons, DelRec):
            entry["recurrent_synapses"] = int(layer.recurrent.weight.numel())
            entry["delays"].append(_delay_stats(block.neurons.delay_type, layer.recurrent))
        layers.append(entry)
    layers.append(
        {
            "name": "readout",
            "neurons": stream.output_size,
            "neuron_model": type(stream.readout_neuron).__name__
            if stream.readout_neuron
            else "none",
            "feedforward_synapses": int(stream.readout.weight.numel()),
            "recurrent_synapses": 0,
            "delays": [],
        }
    )
    return layers


# --------------------------------------------------------------------------- data part
def _unpack(batch) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(frames (T, B, C), lengths (B,) or None, targets (B,))`` from a loader batch."""
    if len(batch) == 3:  # delrec.data.Batch(frames, lengths, targets)
        return batch[0], batch[1], batch[2]
    if len(batch) == 2:
        return batch[0], None, batch[1]
    raise ValueError(
        "loader batches must be (frames, lengths, targets) or (frames, targets) "
        f"with time-major frames (T, B, C); got {len(batch)} items"
    )


def _valid_steps(steps: int, batch: int, lengths: Tensor | None) -> Tensor:
    """``(T, B, 1)`` mask of the steps inside each sample's true length."""
    if lengths is None:
        return torch.ones(steps, batch, 1)
    return (torch.arange(steps)[:, None] < lengths[None, :]).unsqueeze(-1)


def _objective(net: nn.Module, readout: str) -> Regression | Classification:
    """The objective ``net`` was trained for: a regression answers with one ``"ema"`` value
    (training refuses any other readout for one); a classifier has two classes or more."""
    config = net.config
    task = "regression" if readout == "ema" and config.output_size == 1 else "classification"
    return make_objective(task, readout)


@torch.no_grad()
def _evaluate(
    net: nn.Module,
    stream: StreamingNetwork,
    loader,
    readout: str,
    max_batches: int | None,
    count_activity: bool,
) -> dict:
    """One pass over ``loader`` in the current eval mode: the score and, if asked, activity."""
    parameter = next(net.parameters())
    objective = _objective(net, readout)
    meter = objective.meter()
    events = [
        torch.zeros(layer.synapses.in_features, dtype=torch.float64) for layer in stream.layers
    ]
    spikes = [torch.zeros(layer.size, dtype=torch.float64) for layer in stream.layers]
    for number, batch in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            break
        frames, lengths, targets = _unpack(batch)
        output, layer_spikes = net.forward_with_spikes(frames.to(parameter.device, parameter.dtype))
        output, layer_spikes = output.cpu(), [s.cpu() for s in layer_spikes]
        frames = frames.cpu()
        mask = _valid_steps(frames.shape[0], frames.shape[1], lengths)
        lengths = torch.full((output.shape[1],), output.shape[0]) if lengths is None else lengths
        meter.update(*objective(output, lengths.cpu(), targets.cpu()), targets.cpu())
        if count_activity:
            for index, s in enumerate(layer_spikes):
                events[index] += (
                    ((frames if index == 0 else layer_spikes[index - 1]) != 0)
                    .mul(mask)
                    .sum((0, 1))
                    .double()
                )
                spikes[index] += (s * mask).sum((0, 1)).double()
    if meter.count == 0:
        raise ValueError("the loader gave no samples")
    result = {
        "samples": meter.count,
        "metric": objective.metric,
        "score": meter.result()[objective.metric],
    }
    if count_activity:
        result["events"] = [e / meter.count for e in events]
        result["spikes"] = [s / meter.count for s in spikes]
    return result


def _fan_out(synapses: DelayedSynapses) -> Tensor:
    """Non-zero outgoing weights of each presynaptic neuron, ``(I,)``."""
    return (synapses.weight != 0).sum(0).double().cpu()


def _add_activity(layers: list[dict], stream: StreamingNetwork, activity: dict) -> None:
    for index, layer in enumerate(stream.layers):
        synops = float(activity["events"][index] @ _fan_out(layer.synapses))
        if layer.recurrent is not None:
            synops += float(activity["spikes"][index] @ _fan_out(layer.recurrent))
        layers[index]["spikes_per_inference"] = float(activity["spikes"][index].sum())
        layers[index]["synops_per_inference"] = synops
    layers[-1]["spikes_per_inference"] = 0.0
    layers[-1]["synops_per_inference"] = float(activity["spikes"][-1] @ _fan_out(stream.readout))


def hardware_report(
    net: nn.Module,
    loader=None,
    *,
    max_batches: int | None = None,
    target: Target | str | None = None,
) -> dict:
    """A JSON-ready report of ``net`` (a :class:`~delrec.models.SpikingNetwork`).

    Without ``loader``: neurons, synapses, delay histograms and buffer memory per layer. With
    a labelled ``loader`` (batches ``(frames (T, B, C), lengths, targets)`` as
    :func:`delrec.data.make_loader` gives, or ``(frames, targets)``): also spikes and synaptic
    operations per inference in integer-delay mode, and the score (accuracy, or NMSE for the
    ``"ema"`` regression readout) with integer delays versus σ-spread delays
    (``DelRec.integer_eval = False``). ``max_batches`` limits the pass, which also runs delays
    beyond a layer's ``max_delay``. ``net``'s training mode, ``integer_eval`` flags and
    ``max_delay`` are restored afterwards. ``report["max_delay"]`` checks every
    integer delay against ``net.config.max_delay``
    (:func:`~delrec.deploy.targets.max_delay_check`); with a ``target`` (a :class:`Target` or
    its name in :data:`~delrec.deploy.targets.TARGETS`), ``report["target"]`` compares the
    network with its limits (:func:`~delrec.deploy.targets.target_check`).
    """
    if isinstance(target, str):
        target = get_target(target)  # an UnknownTargetError names the known ones
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None: every batch), got {max_batches}")
    stream = StreamingNetwork.from_network(net)
    layers = _static_layers(net, stream)
    report = {"layers": layers}
    if loader is not None:
        readout = getattr(getattr(net, "config", None), "readout", None) or "sum"
        rounding = rounding_layers(net)
        limited = [m for m in net.modules() if isinstance(m, (DelRec, FeedforwardDelay))]
        was_training, flags = net.training, [m.integer_eval for m in rounding]
        limits = [m.max_delay for m in limited]
        try:
            net.eval()
            for module in rounding:
                module.integer_eval = True
            for module in limited:  # measured as it is; report["max_delay"] says it exceeds
                module.max_delay = None
            integer = _evaluate(net, stream, loader, readout, max_batches, count_activity=True)
            for module in rounding:
                module.integer_eval = False
            spread = _evaluate(net, stream, loader, readout, max_batches, count_activity=False)
        finally:
            net.train(was_training)
            for module, flag in zip(rounding, flags):
                module.integer_eval = flag
            for module, limit in zip(limited, limits):
                module.max_delay = limit
        _add_activity(layers, stream, integer)
        report["evaluation"] = {
            "samples": integer["samples"],
            "metric": integer["metric"],
            "integer_delays": integer["score"],
            "spread_delays": spread["score"],
            "rounding_cost": rounding_cost(integer["metric"], spread["score"], integer["score"]),
            "sigma": {
                f"layer{i}": float(block.neurons.sigma) if block.neurons.learn_delays else 0.0
                for i, block in enumerate(net.blocks)
                if isinstance(block.neurons, DelRec)
            },
        }
    totals = {
        key: sum(layer[key] for layer in layers)
        for key in ("neurons", "feedforward_synapses", "recurrent_synapses")
    }
    for key in ("axonal_buffer_bits", "synaptic_buffer_bits", "delay_value_bits"):
        totals[key] = sum(d[key] for layer in layers for d in layer["delays"])
    if loader is not None:
        for key in ("spikes_per_inference", "synops_per_inference"):
            totals[key] = sum(layer[key] for layer in layers)
    report["totals"] = totals
    report["max_delay"] = max_delay_check(
        report, getattr(getattr(net, "config", None), "max_delay", None)
    )
    if target is not None:
        report["target"] = target_check(report, target)
    return report


# --------------------------------------------------------------------------- output
def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    has_activity = "spikes_per_inference" in report["totals"]
    header = [
        "layer",
        "neurons",
        "synapses",
        "delays",
        "max d",
        "mean d",
        "axonal bits",
        "synaptic bits",
    ]
    if has_activity:
        header += ["spikes/inf", "synops/inf"]
    rows = []
    for layer in report["layers"]:
        delays = layer["delays"] or [None]
        for position, d in enumerate(delays):
            first = position == 0
            row = [
                layer["name"] if first else "",
                str(layer["neurons"]) if first else "",
                str(layer["feedforward_synapses"] + layer["recurrent_synapses"]) if first else "",
            ]
            row += (
                [
                    d["kind"],
                    str(d["max"]),
                    f"{d['mean']:.2f}",
                    str(d["axonal_buffer_bits"]),
                    str(d["synaptic_buffer_bits"]),
                ]
                if d
                else ["none", "-", "-", "-", "-"]
            )
            if has_activity:
                row += (
                    [f"{layer['spikes_per_inference']:.1f}", f"{layer['synops_per_inference']:.0f}"]
                    if first
                    else ["", ""]
                )
            rows.append(row)
    t = report["totals"]
    total = [
        "total",
        str(t["neurons"]),
        str(t["feedforward_synapses"] + t["recurrent_synapses"]),
        "",
        "",
        "",
        str(t["axonal_buffer_bits"]),
        str(t["synaptic_buffer_bits"]),
    ]
    if has_activity:
        total += [f"{t['spikes_per_inference']:.1f}", f"{t['synops_per_inference']:.0f}"]
    rows.append(total)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "delay d: arrival 1 + d steps after a recurrent spike, d steps for feedforward delays; "
        "axonal bits = N_pre × max d, synaptic bits = Σ_synapses d"
    )
    if "evaluation" in report:
        e = report["evaluation"]
        lines.append(
            f"{e['metric']} on {e['samples']} samples: integer delays {e['integer_delays']:.4f}, "
            f"σ-spread delays {e['spread_delays']:.4f} (cost of rounding {e['rounding_cost']:+.4f})"
        )
    if "max_delay" in report:
        lines.append(format_max_delay_check(report["max_delay"]))
    if "target" in report:
        lines.append(format_target_check(report["target"]))
    return "\n".join(lines)


def plot_delay_histograms(report: dict, path: str | os.PathLike) -> None:
    """Bar chart of the integer delay histogram of every delay projection, saved as PNG."""
    plt = files.pyplot()

    panels = [(layer["name"], d) for layer in report["layers"] for d in layer["delays"]]
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3), squeeze=False
    )
    for ax, (name, d) in zip(axes[0], panels):
        delays = [int(k) for k in d["histogram"]]
        ax.bar(delays, list(d["histogram"].values()), width=0.9)
        ax.set_title(f"{name}: {d['kind']} delays (max {d['max']})")
        ax.set_xlabel("integer delay d (steps)")
        ax.set_ylabel("count")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no delays in this network", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    files.write_figure(path, fig)
    plt.close(fig)


def report_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Where :func:`write_report` writes: ``hardware_report.json`` and ``delay_histograms.png``
    in ``directory``."""
    directory = Path(directory)
    return directory / "hardware_report.json", directory / "delay_histograms.png"


def write_report(report: dict, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``hardware_report.json`` and ``delay_histograms.png`` into ``directory``."""
    json_path, png_path = report_paths(directory)
    files.write_json(json_path, report)
    plot_delay_histograms(report, png_path)
    return json_path, png_path

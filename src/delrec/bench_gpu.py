"""`delrec bench --device cuda`: the engine on a GPU against a lean PyTorch recurrent LIF loop.

One training step (forward + backward, fixed random loss) of a layer or a whole network is timed
with CUDA events, every model of a setting in turn, repeated, the median kept, so that ratios
are measured side by side. Memory is the peak of ``torch.cuda.max_memory_allocated`` during
the step above what was allocated before it (parameters, inputs). The baseline is the lean
recurrent loop of :class:`delrec.bench.VanillaRecurrentLIF` (autograd, one ``addmm`` and the
LIF step per time step), the same size, on the same GPU.

Settings: those of the GPU targets (T = 250, B = 256), the SSC and SHD preset networks as
``delrec`` and ``rsnn`` (synthetic input of the data sets' shapes; their feedforward layers,
readout, dropout and BatchNorm on the fused engine, which runs the Triton kernels of
:mod:`delrec.engine.triton.fused` on CUDA: the log says which ran) and, without ``--quick``,
the CPU benchmark's grids (:func:`delrec.bench.grids`) on the GPU. ``--dry-run`` runs it all at tiny
sizes on the CPU under Triton's interpreter: it checks the benchmark end to end on a machine
without a GPU and measures nothing. Writes ``gpu-bench.md`` (table and verdicts),
``gpu-bench.csv`` and ``gpu-bench.png`` into ``--out``.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from delrec import bench, files
from delrec.engine import fused
from delrec.engine import triton as gpu
from delrec.layers import DelRec
from delrec.models import build_network, preset_network, readout_reduce
from delrec.neurons import LIF, ATan

LABELS = {
    "triton": "DelRec layer, Triton kernels",
    "torch-ops": "DelRec layer, PyTorch-op loops",
    "vanilla": "lean recurrent LIF loop (autograd)",
    "ssc-delrec": "SSC network, delrec",
    "ssc-rsnn": "SSC network, rsnn",
    "shd-delrec": "SHD network, delrec",
    "shd-rsnn": "SHD network, rsnn",
}
PATH_OF = {"triton": "triton-{}", "torch-ops": "torch-{}"}  # model -> engine path per delay type


@dataclass(frozen=True)
class Setting:
    """One GPU benchmark point: N, B, T, delays ~ U(min_delay, max_delay), spread σ, delay
    type; ``network`` names a preset network instead of one layer (then ``size``, when not 0,
    overrides its hidden sizes: dry runs)."""

    size: int
    batch: int
    steps: int
    max_delay: float
    sigma: float
    min_delay: float = 0.0
    delay_type: str = "axonal"
    network: str | None = None

    def describe(self) -> str:
        if self.network:
            hidden = f" hidden {self.size}" if self.size else ""
            return f"{self.network.upper()} preset network{hidden} B={self.batch} T={self.steps}"
        return (
            f"{self.delay_type} N={self.size} B={self.batch} T={self.steps} "
            f"d~U({self.min_delay:g},{self.max_delay:g}) σ={self.sigma:g}"
        )


# --------------------------------------------------------------------------- what is measured
def target_settings(dry_run: bool) -> dict[str, Setting]:
    """The settings of the GPU targets (tiny ones for a dry run)."""
    main = Setting(256, 256, 250, 30, 10)
    targets = {
        "main": main,
        "short": replace(main, max_delay=10),
        "long": replace(main, max_delay=120),
        "wide": replace(main, size=1024),
        "synaptic": replace(main, delay_type="synaptic"),
        "network": Setting(0, 128, 250, 0, 10, network="ssc"),
        "shd": Setting(0, 256, 100, 0, 10, network="shd"),
    }
    if dry_run:
        shrink = {"size": 20, "batch": 3, "steps": 8}
        targets = {k: replace(s, **shrink) for k, s in targets.items()}
        targets["wide"] = replace(targets["wide"], size=40)
        targets["long"] = replace(targets["long"], max_delay=12)
        targets["network"] = replace(targets["network"], size=16)
        targets["shd"] = replace(targets["shd"], size=16)
    return targets


def grid_settings(dry_run: bool) -> list[Setting]:
    """The CPU benchmark's size and delay panels (:func:`delrec.bench.grids`) at T = 100."""
    size_panel, delay_panel, *_ = bench.grids(quick=dry_run)
    settings = [
        Setting(s.size, s.batch, bench.STEPS, s.max_delay, s.sigma)
        for s in size_panel + delay_panel
    ]
    if dry_run:
        settings = [replace(s, size=min(s.size, 24), batch=2, steps=6) for s in settings[:2]]
    return list(dict.fromkeys(settings))


# --------------------------------------------------------------------------- one training step
def _neuron() -> LIF:
    return LIF(tau=2.0, v_reset=0.0, detach_reset=True, surrogate=ATan(5.0))


class Step:
    """One training step of ``model`` at ``s`` on ``device``: forward, a loss, backward."""

    def __init__(self, model: str, s: Setting, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.model = model
        if s.network:
            cfg = preset_network(s.network, model.split("-", 1)[1])
            if s.size:
                cfg = preset_network(
                    s.network,
                    model.split("-", 1)[1],
                    hidden_sizes=(s.size,) * len(cfg.hidden_sizes),
                )
            self.module = build_network(cfg, seed=seed).to(device)
            for layer in self.module.modules():
                if isinstance(layer, DelRec) and layer.learn_delays:
                    layer.sigma.fill_(s.sigma)
            frames = torch.rand(s.steps, s.batch, cfg.input_size, generator=g) < 0.05
            self.inputs = frames.float().to(device)
            self.targets = torch.randint(cfg.output_size, (s.batch,), generator=g).to(device)
            self.readout = cfg.readout
        else:
            self.module = _layer(model, s, g).to(device)
            current = torch.randn(s.steps, s.batch, s.size, generator=g) * 0.6 + 0.3
            self.inputs = current.to(device).requires_grad_()
            self.grad_out = torch.randn(s.steps, s.batch, s.size, generator=g).to(device)
        self.module.train()

    def __call__(self) -> None:
        self.module.zero_grad(set_to_none=True)
        if hasattr(self, "targets"):
            logits = readout_reduce(self.module(self.inputs), self.readout)
            loss = nn.functional.cross_entropy(logits, self.targets)
        else:
            self.inputs.grad = None
            loss = (self.module(self.inputs) * self.grad_out).sum()
        loss.backward()


def _layer(model: str, s: Setting, g: torch.Generator) -> nn.Module:
    if model == "vanilla":
        return bench.VanillaRecurrentLIF(s.size, _neuron())
    return DelRec(
        s.size,
        _neuron(),
        delay_type=s.delay_type,
        delay_init=f"uniform:{s.min_delay:g}:{s.max_delay:g}",
        sigma=s.sigma,
        engine=PATH_OF[model].format(s.delay_type),
        generator=g,
    )


class Clock:
    """Milliseconds of a call: CUDA events on a GPU, the wall clock elsewhere (dry runs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def peak_mb(self, fn) -> float | None:
        """Peak memory allocated during ``fn()`` above what was allocated before (MB)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(s: Setting, models, repeats: int, device: torch.device, log) -> list[dict]:
    """Rows for every model at ``s``: median step time over ``repeats`` interleaved steps (after
    one warm-up step, which compiles the kernels), and the step's peak memory."""
    clock = Clock(device)
    steps = {}
    for model in models:
        try:
            steps[model] = Step(model, s, device)
            steps[model]()  # warm-up: compiles, allocates
        except Exception as error:  # noqa: BLE001 (a failed model is reported, the rest runs)
            log(f"   {model}: FAILED at {s.describe()}: {type(error).__name__}: {error}")
            steps.pop(model, None)
    times = {m: [] for m in steps}
    for _ in range(repeats):
        for model, step in steps.items():
            times[model].append(clock(step))
    rows = []
    for model, step in steps.items():
        time_ms = statistics.median(times[model])
        row = {**asdict(s), "model": model, "time_ms": time_ms, "peak_mb": clock.peak_mb(step)}
        row["samples_per_s"] = 1e3 * s.batch / time_ms
        rows.append(row)
        peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:9.1f} MB"
        log(
            f"   {LABELS[model]:36s} {time_ms:9.2f} ms  peak {peak}  "
            f"{row['samples_per_s']:9.1f} samples/s"
        )
    return rows


# --------------------------------------------------------------------------- targets
def _find(rows, s: Setting, model):
    return next((r for r in rows if r["model"] == model and r["_setting"] == s), None)


def verdicts(rows, targets: dict[str, Setting], dry_run: bool, pending=()) -> list[str]:
    """PASS/FAIL lines for the GPU targets, each with its measured ratio; a target that needs
    one of the settings ``pending`` (not run yet) says so instead."""
    lines = [
        "Targets" + (" (dry run: tiny sizes on the CPU, ratios meaningless)" if dry_run else "")
    ]

    def line(ok, text):  # a dry run's figures judge nothing
        lines.append(f"{'n/a ' if dry_run else 'PASS' if ok else 'FAIL'}  {text}")

    def ratio(a, b, key="time_ms"):
        if a is None or b is None:
            return "a model failed"
        if a[key] is None or b[key] is None:
            return "no GPU"
        return a[key] / b[key]

    def check(value, limit, text, *needs):
        if any(s in pending for s in needs):
            lines.append(f"----  {text}: not measured yet (the run had not reached it)")
        elif isinstance(value, str):
            lines.append(f"{'n/a ' if dry_run else 'FAIL'}  {text}: not measured ({value})")
        else:
            line(value <= limit, f"{text} ×{value:.2f} (target ≤ {limit:g})")

    main, short, long, wide, syn, net = (
        targets[k] for k in ("main", "short", "long", "wide", "synaptic", "network")
    )
    check(
        ratio(_find(rows, main, "triton"), _find(rows, main, "vanilla")),
        0.5,
        f"{main.describe()}: Triton/lean loop step time",
        main,
    )
    check(
        ratio(_find(rows, long, "triton"), _find(rows, short, "triton")),
        1.2,
        f"axonal N={main.size}: step time, delays ≤ {long.max_delay:g} / delays ≤ "
        f"{short.max_delay:g}",
        long,
        short,
    )
    check(
        ratio(_find(rows, main, "triton"), _find(rows, main, "vanilla"), "peak_mb"),
        1.5,
        f"{main.describe()}: Triton/lean loop peak memory",
        main,
    )
    check(
        ratio(_find(rows, wide, "triton"), _find(rows, wide, "vanilla")),
        1.0,
        f"{wide.describe()} (forward and backward): Triton/lean loop step time",
        wide,
    )
    check(
        ratio(_find(rows, syn, "triton"), _find(rows, main, "triton")),
        3.0,
        f"synaptic N={syn.size} delays ≤ {syn.max_delay:g}: synaptic/axonal Triton step time",
        syn,
        main,
    )
    for s in (net, targets["shd"]):
        d, r = (_find(rows, s, f"{s.network}-{model}") for model in ("delrec", "rsnn"))
        if d and r:
            lines.append(
                f"      {s.describe()}: delrec {d['samples_per_s']:.0f} samples/s, "
                f"rsnn {r['samples_per_s']:.0f} samples/s"
            )
        check(ratio(d, r), 1.15, f"{s.describe()}: delrec/rsnn step time", s)
    return lines


# --------------------------------------------------------------------------- the run
def run(args) -> int:
    dry_run = args.dry_run
    if dry_run:
        if not gpu.interpreting():
            if "triton" in sys.modules:  # too late: its kernels would compile for a GPU
                raise RuntimeError(
                    "the dry run interprets the Triton kernels on the CPU, which needs "
                    "TRITON_INTERPRET=1 before triton is imported: set it in the environment "
                    "(TRITON_INTERPRET=1 delrec bench --device cuda --dry-run …)"
                )
            os.environ["TRITON_INTERPRET"] = "1"
        gpu.offer_interpreted_paths()
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("the GPU benchmark needs a CUDA device (or dry_run)")
        device = torch.device("cuda")
    repeats = args.repeats or (1 if dry_run else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = bench.Log()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    grid = "dry run" if dry_run else "quick" if args.quick else "full"
    log(
        f"delrec bench --device cuda ({grid}): {name}, torch {torch.__version__}, "
        f"triton {_triton_version()}, {repeats} repeats "
        f"(median), {'CPU timing' if device.type != 'cuda' else 'CUDA-event timing'}, "
        "peak = max_memory_allocated above the step's inputs"
    )
    log(f"networks around the delays: {_feedforward_kernels(device)}")
    targets = target_settings(dry_run)
    sections = [
        ("GPU targets: axonal layer", [targets["main"]], ("triton", "torch-ops", "vanilla")),
        (
            "Delay range and size",
            [targets["short"], targets["long"], targets["wide"]],
            ("triton", "vanilla"),
        ),
        ("Synaptic delays", [targets["synaptic"]], ("triton",)),
        ("Whole network: SSC", [targets["network"]], ("ssc-delrec", "ssc-rsnn")),
        ("Whole network: SHD", [targets["shd"]], ("shd-delrec", "shd-rsnn")),
    ]
    if not args.quick:
        sections.append(
            ("CPU grids on the GPU (T = 100)", grid_settings(dry_run), ("triton", "vanilla"))
        )
    rows, queue = [], [s for _, settings, _ in sections for s in settings]

    def write(done: int):  # after every setting: a run stopped early leaves what it measured
        checks = verdicts(rows, targets, dry_run, pending=queue[done:])
        header = log.lines[0]
        if done < len(queue):  # first, so that the figure's shortened title keeps it
            header = f"INCOMPLETE ({done} of {len(queue)} settings measured so far) {header}"
        _write_csv(rows, out / "gpu-bench.csv")
        _write_markdown(rows, checks, header, out / "gpu-bench.md")
        _plot(rows, out / "gpu-bench.png", header)
        return checks

    done, failed = 0, []
    for title, settings, models in sections:
        log()
        log(title)
        for s in settings:
            log(f" {s.describe()}")
            measured = measure(s, models, repeats, device, log)
            failed += [f"{m} at {s.describe()}" for m in models if m not in _models(measured)]
            for row in measured:
                row["_setting"] = s
            rows.extend(measured)
            done += 1
            checks = write(done)
    log()
    for text in checks:
        log(text)
    log(f"\nwrote {out / 'gpu-bench.md'}, {out / 'gpu-bench.csv'}, {out / 'gpu-bench.png'}")
    if failed:
        log(f"{len(failed)} measurement(s) failed (FAILED above): {'; '.join(failed)}")
        return 1
    return 0


def _models(rows: list[dict]) -> set[str]:
    return {row["model"] for row in rows}


def _feedforward_kernels(device: torch.device) -> str:
    """Which kernels run the preset networks' feedforward layers, readout, dropout and
    BatchNorm on ``device`` (the fused engine, :mod:`delrec.engine.fused`)."""
    kernels = fused.kernels_for(device)
    if kernels is None:
        return "the reference (step-by-step autograd): no fused kernels here"
    kind = "Triton" if kernels.__name__ == "delrec.engine.triton.fused" else "C++"
    return f"fused, {kind} kernels ({kernels.__name__})"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


FIELDS = [
    "model",
    "network",
    "delay_type",
    "size",
    "batch",
    "steps",
    "min_delay",
    "max_delay",
    "sigma",
    "time_ms",
    "peak_mb",
    "samples_per_s",
]


def _write_csv(rows, path: Path) -> None:
    files.write_csv(path, rows, FIELDS)


def _write_markdown(rows, checks, header: str, path: Path) -> None:
    text = [f"# {header}", "", "| setting | model | step (ms) | peak (MB) | samples/s |"]
    text.append("|---|---|---:|---:|---:|")
    for r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        text.append(
            f"| {r['_setting'].describe()} | {LABELS[r['model']]} | {r['time_ms']:.2f} | {peak} "
            f"| {r['samples_per_s']:.1f} |"
        )
    text += ["", "```", *checks, "```", ""]
    files.write_text(path, "\n".join(text))


def _plot(rows, path: Path, header: str) -> None:
    plt = files.pyplot()

    labels = [f"{r['_setting'].describe()}\n{r['model']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.35 * len(rows) + 1)))
    for ax, key, unit in ((axes[0], "time_ms", "ms per training step"), (axes[1], "peak_mb", "MB")):
        values = [r[key] if r[key] is not None else math.nan for r in rows]
        colours = [f"C{list(LABELS).index(r['model'])}" for r in rows]
        ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        if any(v > 0 for v in values):  # (no memory figures off the GPU)
            ax.set_xscale("log")
        ax.set_xlabel(unit)
    axes[0].set_title("training-step time", fontsize=10)
    axes[1].set_title("peak memory of the step", fontsize=10)
    fig.suptitle(header[:120], fontsize=8)
    fig.tight_layout()
    files.write_figure(path, fig, dpi=110)
    plt.close(fig)

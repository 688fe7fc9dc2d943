"""`delrec bench`: the cost of recurrent delays on this machine (the four panels of Fig. S1).

One training step (forward + backward of a single layer, T = 100) is timed for every model of a
configuration in turn, repeated, and the median kept, so that ratios are measured side by side.
Memory is reported twice: the bytes autograd keeps for backward (``saved_tensors_hooks``,
distinct storages) and the peak resident memory of the step (the rise of the process's VmHWM,
reset through ``/proc/self/clear_refs`` after returning freed heap memory with ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from delrec import files
from delrec.engine import native
from delrec.layers import DelRec, FeedforwardDelay
from delrec.neurons import LIF, ATan, lif_step

STEPS = 100
MODELS = ("reference", "fast", "fast-synaptic", "vanilla", "feedforward", "ff-delay")
LABELS = {
    "reference": "DelRec, reference loop",
    "fast": "DelRec, fast engine (axonal)",
    "fast-synaptic": "DelRec, fast engine (synaptic)",
    "vanilla": "vanilla recurrent LIF",
    "feedforward": "feedforward LIF",
    "ff-delay": "feedforward delays + LIF",
    "ff-conv": "feedforward delays + LIF (conv)",
}
# Work the reference loop and the synaptic engine's fallback (lag-stacked GEMMs, when the C++
# kernels can't be built) may take per configuration before being skipped:
# multiply-adds per training step (~3 T·B·N²·L) and, for the reference loop, peak memory (it keeps
# about T·B·N·L floats for backward and peaks near five times that).
MAX_MACS = 4e11
MAX_REFERENCE_PEAK_BYTES = 3e9


# --------------------------------------------------------------------------- baselines
class VanillaRecurrentLIF(nn.Module):
    """Plain recurrent LIF layer run by autograd: ``u[t] = c[t] + s[t-1] Wᵀ`` (no delays)."""

    def __init__(self, size: int, neuron: LIF):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, size))
        nn.init.orthogonal_(self.weight)
        self.p = neuron.p

    def forward(self, current: Tensor) -> Tensor:
        """Current ``(T, B, N)`` → spikes ``(T, B, N)``."""
        s = torch.zeros_like(current[0])
        v = torch.full_like(current[0], self.p.v_rest)
        spikes = []
        for c_t in current:
            s, v = lif_step(torch.addmm(c_t, s, self.weight.t()), v, self.p)
            spikes.append(s)
        return torch.stack(spikes)


class FeedforwardLIF(nn.Module):
    """Feedforward SNN layer: a linear map over all steps (or feedforward delays up to
    ``delays`` steps, run by ``engine``), then LIF neurons."""

    def __init__(self, size: int, neuron: LIF, delays: int = 0, engine: str = "auto"):
        super().__init__()
        self.synapses = (
            FeedforwardDelay(size, size, kernel_size=delays + 1, engine=engine)
            if delays
            else nn.Linear(size, size)
        )
        self.neuron = neuron

    def forward(self, x: Tensor) -> Tensor:
        return self.neuron(self.synapses(x))


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Setting:
    """One benchmark point: layer size N, batch B, delays ~ U(min_delay, max_delay), spread σ."""

    size: int
    batch: int
    max_delay: float
    sigma: float
    min_delay: float = 0.0

    @property
    def lags(self) -> int:
        return math.ceil(1 + self.max_delay + 1 + self.sigma) + 1

    def describe(self) -> str:
        return (
            f"N={self.size} B={self.batch} d~U({self.min_delay:g},{self.max_delay:g}) "
            f"σ={self.sigma:g}"
        )


def skip_reason(model: str, s: Setting) -> str | None:
    """Why ``model`` is not run at ``s`` (too slow or too big here), or None."""
    macs = 3 * STEPS * s.batch * s.size**2 * s.lags
    if model == "reference":
        peak = 5 * STEPS * s.batch * s.size * s.lags * 4
        if macs > MAX_MACS or peak > MAX_REFERENCE_PEAK_BYTES:
            return (
                f"reference loop skipped at {s.describe()}: ~{macs / 1e9:.0f} G multiply-adds "
                f"and ~{peak / 1e9:.1f} GB peak memory per step"
            )
    if model == "ff-conv" and 3 * STEPS * s.batch * s.size**2 * (s.max_delay + 1) > MAX_MACS:
        return f"feedforward-delay convolution skipped at {s.describe()} (K taps per synapse)"
    if model == "fast-synaptic" and 2 * macs > MAX_MACS and native.load("synaptic") is None:
        return (
            f"synaptic engine skipped at {s.describe()}: ~{2 * macs / 1e9:.0f} G multiply-adds "
            "per step (without the C++ kernels per-synapse lags cost one GEMM per lag)"
        )
    return None


def build(model: str, s: Setting, generator: torch.Generator) -> nn.Module:
    neuron = LIF(tau=2.0, v_reset=0.0, detach_reset=True, surrogate=ATan(5.0))
    init = f"uniform:{s.min_delay:g}:{s.max_delay:g}"
    if model in ("reference", "fast", "fast-synaptic"):
        return DelRec(
            s.size,
            neuron,
            delay_type="synaptic" if model == "fast-synaptic" else "axonal",
            delay_init=init,
            sigma=s.sigma,
            engine="reference" if model == "reference" else "fast",
            generator=generator,
        )
    if model == "vanilla":
        return VanillaRecurrentLIF(s.size, neuron)
    if model == "feedforward":
        return FeedforwardLIF(s.size, neuron)
    engine = "reference" if model == "ff-conv" else "auto"
    return FeedforwardLIF(s.size, neuron, delays=int(s.max_delay), engine=engine)


# --------------------------------------------------------------------------- measurements
def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``run()`` executes (its
    result is dropped)."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    return sum(storages.values())


def _reset_peak_rss() -> int | None:
    """Return freed memory to the OS and reset VmHWM; the resident bytes now (None: unsupported)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


class Step:
    """One training step of a layer: forward, a fixed random loss, backward."""

    def __init__(self, module: nn.Module, s: Setting, generator: torch.Generator):
        self.module = module
        self.current = (
            torch.randn(STEPS, s.batch, s.size, generator=generator) * 0.6 + 0.3
        ).requires_grad_()
        self.grad_out = torch.randn(STEPS, s.batch, s.size, generator=generator)

    def __call__(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.current.grad = None
        (self.module(self.current) * self.grad_out).sum().backward()

    def saved_bytes(self) -> int:
        return saved_bytes(lambda: self.module(self.current))

    def peak_rss(self) -> int | None:
        before = _reset_peak_rss()
        if before is None:
            return None
        self()
        return _proc_status("VmHWM") - before


class Log:
    """What a benchmark prints: ``log(text)`` prints a line and keeps it in ``log.lines`` (for
    the ``.txt`` and ``.md`` files the benchmark writes)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def median_times(timers: dict, repeats: int, clock=time.perf_counter, warm_up: bool = True) -> dict:
    """Median seconds per call of each of ``timers`` (name → function), over ``repeats`` rounds
    that call them in turn, so that a busy neighbour slows all of them alike; ``warm_up``: one
    round first, not timed. ``clock``: ``time.perf_counter``, ``time.process_time``, or one
    that waits for a GPU's queued work before reading the time."""
    if warm_up:
        for run in timers.values():
            run()
    times = {name: [] for name in timers}
    for _ in range(repeats):
        for name, run in timers.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(s: Setting, models, repeats: int, clock, log, cache: dict) -> list[dict]:
    """Rows of measurements for every runnable model at ``s``; the models not in ``cache`` (keyed by
    setting, model and repeats) are run interleaved, one step of each in turn, ``repeats`` times,
    and the median time kept."""
    steps = {}
    for model in models:
        reason = skip_reason(model, s)
        if reason:
            log(f"  {reason}")
        elif (s, model, repeats) not in cache:
            g = torch.Generator().manual_seed(0)
            steps[model] = Step(build(model, s, g), s, g)
            steps[model]()  # warm-up
    medians = median_times(steps, repeats, clock, warm_up=False)  # each warmed up when built
    for model, step in steps.items():
        rss = step.peak_rss()
        cache[(s, model, repeats)] = {
            **asdict(s),
            "model": model,
            "time_ms": 1e3 * medians[model],
            "saved_mb": step.saved_bytes() / 2**20,
            "peak_rss_mb": None if rss is None else rss / 2**20,
        }
    return [dict(cache[(s, m, repeats)]) for m in models if (s, m, repeats) in cache]


# --------------------------------------------------------------------------- the run
def grids(quick: bool):
    """(size panel, delay panel, cost-of-delays, SHD setting, synaptic) settings."""
    batch = 32
    sizes = [64, 256] if quick else [64, 128, 256, 512, 1024]
    max_delays = [10, 20] if quick else [10, 30, 60, 90, 120]
    size_panel = [Setting(n, batch, 10, 10) for n in sizes]
    delay_panel = [Setting(256, batch, d, 10) for d in max_delays]
    cost = [
        Setting(256, b, d, sig)
        for b in ([32] if quick else [32, 128])
        for d in ([10, 120] if quick else [10, 30, 60, 120])
        for sig in (0, 10)
    ]
    shd = Setting(256, 32 if quick else 128, 30, 10, min_delay=10)
    synaptic = [Setting(n, batch, d, 10) for n, d in SYNAPTIC_TARGETS]
    return size_panel, delay_panel, cost, shd, synaptic


# Synaptic vs axonal delays: (N, max delay) -> the largest synaptic/axonal time ratio,
# at B = 32, delays ~ U(0, max delay), σ = 10; in the quick grid too
SYNAPTIC_TARGETS = {(512, 10): 2.0, (256, 120): 2.5, (512, 120): 2.5}


def feedforward_grid(quick: bool) -> list[Setting]:
    """Feedforward delays vs the feedforward LIF layer: N = 256 (and 1024), max delay 10, 120."""
    return [Setting(n, 32, d, 0) for n in ([256] if quick else [256, 1024]) for d in (10, 120)]


SECTIONS = ("size", "delay", "cost", "shd", "synaptic", "feedforward")


def run(args) -> int:
    """``delrec bench`` on the CPU engines: the grids, the verdicts, the files in ``args.out``."""
    started, commit = time.perf_counter(), git_describe()  # the code measured, before any edit
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.quick else 5)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log()

    log(
        f"delrec bench ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU {cpu_name()} ({platform.machine()}), "
        f"T = {STEPS}, {args.repeats} repeats (median), clock = {args.clock}"
    )
    log(
        "time = one training step (forward + backward of one layer); saved = bytes autograd keeps "
        "for backward; peak RSS = rise of the process's resident high-water mark during a step"
    )
    size_panel, delay_panel, cost, shd, synaptic = grids(args.quick)
    rows, cache = [], {}
    # (panel, title, settings, models, repeat factor: cheap cost-of-delays pairs repeat more)
    sections = [
        ("size", "Panels a, c: hidden size (delays ~ U(0, 10), σ = 10)", size_panel, MODELS, 1),
        (
            "delay",
            "Panels b, d: maximum delay (N = 256, σ = 10)",
            delay_panel,
            ("reference", "fast", "fast-synaptic", "vanilla", "ff-delay"),
            1,
        ),
        (
            "cost",
            "Cost of delays (axonal fast engine vs vanilla, N = 256)",
            cost,
            ("fast", "vanilla"),
            3,
        ),
        ("shd", "SHD setting", [shd], ("reference", "fast"), 1),
        ("synaptic", "Synaptic vs axonal delays", synaptic, ("fast", "fast-synaptic"), 1),
        (
            "feedforward",
            "Feedforward delays (two taps per synapse) vs feedforward LIF",
            feedforward_grid(args.quick),
            ("feedforward", "ff-delay", "ff-conv"),
            1,
        ),
    ]
    if getattr(args, "sections", None):
        sections = [section for section in sections if section[0] in args.sections]
    ran = {panel for panel, *_ in sections}
    for panel, title, settings, models, factor in sections:
        factor = 1 if args.quick else factor
        log()
        log(f"{title}, {factor * args.repeats} repeats")
        if panel == "feedforward":
            kernels = native.load("feedforward")
            vectors = "not built: PyTorch ops" if kernels is None else f"{kernels.simd} vectors"
            log(f" the C++ feedforward kernels run here with {vectors}")
        for s in settings:
            log(f" {s.describe()}")
            measured = measure(s, models, factor * args.repeats, clock, log, cache)
            for row in measured:
                row["panel"] = panel
            rows.extend(measured)
            _print_rows(measured, log)
    log()
    if ran - {"feedforward"}:  # the engine's targets, those of the sections that ran
        for line in target_checks(rows, cost if "cost" in ran else [], shd, args.quick):
            log(line)
        for line in synaptic_checks(rows, synaptic):
            log(line)
    if "feedforward" in ran:
        if ran == {"feedforward"}:
            log("Targets (feedforward delays)")
        for line in feedforward_checks(rows, feedforward_grid(args.quick)):
            log(line)
    _write_csv(rows, out / "bench.csv")
    figure = out / "bench.png" if ran & {"size", "delay"} else None  # the panels of Fig. S1
    if figure:
        _plot(rows, figure)
    else:  # an earlier run's figure would sit beside these numbers as if it showed them
        (out / "bench.png").unlink(missing_ok=True)
    files.write_text(out / "bench.txt", "\n".join(log.lines) + "\n")
    titles = {panel: title for panel, title, *_ in sections}
    verdicts = [line for line in log.lines if line.startswith(("PASS", "FAIL"))]
    elapsed = time.perf_counter() - started
    command = command_line(args)
    write_markdown(rows, titles, verdicts, out / "bench.md", command, commit, elapsed, figure)
    written = [out / "bench.csv", *([figure] if figure else []), out / "bench.txt"]
    log(f"\nwrote {', '.join(map(str, written))}, {out / 'bench.md'}")
    return 0


def _baseline(rows):
    """The row a setting's other rows are compared with: the vanilla layer, else the axonal one,
    else (feedforward delays) the feedforward LIF layer."""
    by_model = {r["model"]: r for r in rows}
    return by_model.get("vanilla") or by_model.get("fast") or by_model.get("feedforward")


def _print_rows(rows, log):
    base = _baseline(rows)
    for r in rows:
        rss = "   n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:8.1f}"
        rel = (
            f"  ×{r['time_ms'] / base['time_ms']:5.2f} time, "
            f"×{r['saved_mb'] / base['saved_mb']:5.2f} saved vs {base['model']}"
            if base and r is not base
            else ""
        )
        log(
            f"   {LABELS[r['model']]:32s} {r['time_ms']:9.1f} ms  saved {r['saved_mb']:8.2f} MB  "
            f"peak RSS {rss} MB{rel}"
        )


def _find(rows, panel, s: Setting, model):
    for r in rows:
        if (
            r["panel"],
            r["model"],
            r["size"],
            r["batch"],
            r["max_delay"],
            r["sigma"],
            r["min_delay"],
        ) == (panel, model, s.size, s.batch, s.max_delay, s.sigma, s.min_delay):
            return r
    return None


def target_checks(rows, cost, shd, quick) -> list[str]:
    """PASS/FAIL lines for the engine's targets (docs/engine.md#delrec-bench), with the ratios."""
    lines = [
        "Targets"
        + (
            " (quick grid: reduced settings, run without --quick for the real checks)"
            if quick
            else ""
        )
    ]

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    for s in cost:
        f, v = _find(rows, "cost", s, "fast"), _find(rows, "cost", s, "vanilla")
        ratio = f["time_ms"] / v["time_ms"]
        lines.append(
            f"{verdict(ratio <= 1.5)}  cost of delays {s.describe()}: fast/vanilla time "
            f"×{ratio:.2f} (target ≤ 1.5)"
        )
    by_delay = {}
    for s in cost:
        f, v = _find(rows, "cost", s, "fast"), _find(rows, "cost", s, "vanilla")
        by_delay.setdefault((s.batch, s.sigma), []).append((f["saved_mb"], v["saved_mb"]))
    for (batch, sigma), pairs in by_delay.items():
        worst = max(fs / vs for fs, vs in pairs)
        flat = max(fs for fs, _ in pairs) == min(fs for fs, _ in pairs)
        lines.append(
            f"{verdict(worst <= 1 and flat)}  memory saved for backward, N=256 B={batch} "
            f"σ={sigma:g}, "
            f"max delay {min(s.max_delay for s in cost):g}…{max(s.max_delay for s in cost):g}: "
            f"fast/vanilla ×{worst:.2f} (target ≤ 1), {'flat' if flat else 'NOT flat'} in the delay"
        )
    ref, fst = _find(rows, "shd", shd, "reference"), _find(rows, "shd", shd, "fast")
    if ref and fst:
        t, m = ref["time_ms"] / fst["time_ms"], ref["saved_mb"] / fst["saved_mb"]
        lines.append(
            f"{verdict(t >= 5)}  SHD setting {shd.describe()}: reference/fast time ×{t:.1f} "
            "(target ≥ 5)"
        )
        lines.append(
            f"{verdict(m >= 10)}  SHD setting {shd.describe()}: reference/fast saved memory "
            f"×{m:.1f} "
            f"(target ≥ 10)"
        )
    delay_rows = sorted((r for r in rows if r["panel"] == "delay"), key=lambda r: r["max_delay"])
    growth = [
        (r["max_delay"], _ratio(delay_rows, r["max_delay"]))
        for r in delay_rows
        if r["model"] == "reference"
    ]
    growth = [(d, g) for d, g in growth if g]
    if len(growth) > 1:
        grows = all(b[1][0] > a[1][0] and b[1][1] > a[1][1] for a, b in zip(growth, growth[1:]))
        lines.append(
            f"{verdict(grows)}  reference/fast ratios grow with the delay range: "
            + ", ".join(f"d≤{d:g}: ×{t:.1f} time ×{m:.1f} memory" for d, (t, m) in growth)
        )
    if len(lines) == 1:
        lines.append("(none among the sections that ran)")
    return lines


def synaptic_checks(rows, settings) -> list[str]:
    """PASS/FAIL lines for the synaptic engine's targets: synaptic/axonal time within
    ``SYNAPTIC_TARGETS``, the synaptic engine's saved memory no more than the axonal engine's and
    the same bytes whatever the delay range."""
    lines = []
    for s in settings:
        ax, sy = _find(rows, "synaptic", s, "fast"), _find(rows, "synaptic", s, "fast-synaptic")
        if not (ax and sy):
            continue
        t, m = sy["time_ms"] / ax["time_ms"], sy["saved_mb"] / ax["saved_mb"]
        target = SYNAPTIC_TARGETS.get((s.size, s.max_delay), 4.0)
        lines.append(
            f"{'PASS' if t <= target else 'FAIL'}  synaptic vs axonal {s.describe()}: time "
            f"×{t:.2f} (target ≤ {target:g})"
        )
        lines.append(
            f"{'PASS' if m <= 1 else 'FAIL'}  synaptic vs axonal {s.describe()}: saved memory "
            f"×{m:.2f} (target ≤ 1)"
        )
    for size in sorted({s.size for s in settings}):
        saved = [
            r["saved_mb"]
            for s in settings
            if s.size == size and (r := _find(rows, "synaptic", s, "fast-synaptic"))
        ]
        if len(saved) > 1:
            flat = max(saved) == min(saved)
            lines.append(
                f"{'PASS' if flat else 'FAIL'}  synaptic delays N={size}: saved memory "
                f"{'flat' if flat else 'NOT flat'} in the delay range "
                f"({min(saved):.2f}…{max(saved):.2f} MB)"
            )
    return lines


def feedforward_checks(rows, settings) -> list[str]:
    """PASS/FAIL lines for the feedforward-delay targets: feedforward delays + LIF within 2x the
    feedforward LIF layer in time and in saved memory, the saved memory flat in the window."""
    lines = []
    for s in settings:
        d, f = (
            _find(rows, "feedforward", s, "ff-delay"),
            _find(rows, "feedforward", s, "feedforward"),
        )
        t, m = d["time_ms"] / f["time_ms"], d["saved_mb"] / f["saved_mb"]
        lines.append(
            f"{'PASS' if t <= 2 else 'FAIL'}  feedforward delays {s.describe()}: time ×{t:.2f} "
            "the feedforward LIF layer (target ≤ 2)"
        )
        lines.append(
            f"{'PASS' if m <= 2 else 'FAIL'}  feedforward delays {s.describe()}: saved memory "
            f"×{m:.2f} the feedforward LIF layer (target ≤ 2)"
        )
    for size in sorted({s.size for s in settings}):
        saved = [
            _find(rows, "feedforward", s, "ff-delay")["saved_mb"]
            for s in settings
            if s.size == size
        ]
        flat = max(saved) == min(saved)
        lines.append(
            f"{'PASS' if flat else 'FAIL'}  feedforward delays N={size}: saved memory "
            f"{'flat' if flat else 'NOT flat'} in the window ({min(saved):.1f}…{max(saved):.1f} MB)"
        )
    return lines


def _ratio(rows, max_delay):
    ref = next((r for r in rows if r["max_delay"] == max_delay and r["model"] == "reference"), None)
    fst = next((r for r in rows if r["max_delay"] == max_delay and r["model"] == "fast"), None)
    if not (ref and fst):
        return None
    return ref["time_ms"] / fst["time_ms"], ref["saved_mb"] / fst["saved_mb"]


def _write_csv(rows, path: Path) -> None:
    fields = [
        "panel",
        "model",
        "size",
        "batch",
        "min_delay",
        "max_delay",
        "sigma",
        "time_ms",
        "saved_mb",
        "peak_rss_mb",
    ]
    files.write_csv(path, rows, fields)


def _plot(rows, path: Path) -> None:
    plt = files.pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0, 0], "size", "size", "saved_mb", "(a) memory saved for backward vs hidden size"),
        (
            axes[0, 1],
            "delay",
            "max_delay",
            "saved_mb",
            "(b) memory saved for backward vs max delay",
        ),
        (axes[1, 0], "size", "size", "time_ms", "(c) training-step time vs hidden size"),
        (axes[1, 1], "delay", "max_delay", "time_ms", "(d) training-step time vs max delay"),
    ]
    for ax, panel, x, y, title in panels:
        for colour, model in enumerate(MODELS):
            points = sorted(
                (r[x], r[y]) for r in rows if r["panel"] == panel and r["model"] == model
            )
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{colour}", label=LABELS[model])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("hidden size N" if x == "size" else "maximum delay (steps)")
        ax.set_ylabel("MB" if y == "saved_mb" else "ms per step")
        ax.set_yscale("log")
        if x == "size":
            ax.set_xscale("log", base=2)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"delrec bench, T = {STEPS} (CPU, torch {torch.__version__})")
    fig.tight_layout()
    files.write_figure(path, fig)
    plt.close(fig)


# --------------------------------------------------------------------------- the markdown report
def command_line(args) -> str:
    """The ``delrec bench`` command that reruns this measurement, every option spelled out."""
    words = ["delrec", "bench"]
    for key, value in vars(args).items():
        if key == "command" or callable(value) or value is None or value is False:
            continue
        if key == "device" and value == "cpu":  # the default: this benchmark
            continue
        words.append("--" + key.replace("_", "-"))
        if isinstance(value, list):
            words.extend(shlex.quote(str(v)) for v in value)
        elif value is not True:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def git_describe() -> str:
    """``git describe`` of the source tree this module runs from, or why there is none."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def write_markdown(
    rows,
    titles,
    verdicts,
    path: Path,
    command: str,
    commit: str,
    elapsed_s: float,
    figure: Path | None,
) -> None:
    """``bench.md``: how the figures were made (command, commit, date, machine), the figure
    (when drawn), the target verdicts and one table per section (``titles``: panel -> heading),
    times and saved bytes also as ratios to the section's baseline (:func:`_baseline`)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# `delrec bench` results",
        "",
        "Generated by the command below; do not edit by hand, rerun it to refresh "
        f"(`bench.csv`, {f'`{figure.name}`, ' if figure else ''}`bench.txt` come from the same "
        "run).",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| commit | `{commit}` |",
        f"| date | {when} |",
        f"| CPU | {cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores |",
        f"| threads | {torch.get_num_threads()} torch thread(s) |",
        f"| software | torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} |",
        f"| run time | {elapsed_s / 60:.1f} min |",
        "",
        f"One training step = forward + backward of one layer over T = {STEPS} steps with a "
        "fixed random loss; time is the median over the repeats, the models of a setting run "
        "in turn. Saved = bytes autograd keeps for backward; peak RSS = rise of the process's "
        "resident high-water mark during a step.",
        "",
        *([f"![delrec bench]({figure.name})", ""] if figure else []),
        "## Targets",
        "",
        *(f"- {line}" for line in verdicts),
    ]
    for panel, title in titles.items():
        section = [r for r in rows if r["panel"] == panel]
        if not section:
            continue
        out += [
            "",
            f"## {title}",
            "",
            "| setting | model | time (ms) | saved (MB) | peak RSS (MB) | time ratio "
            "| saved ratio |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        settings = {}
        for r in section:
            key = (r["size"], r["batch"], r["min_delay"], r["max_delay"], r["sigma"])
            settings.setdefault(key, []).append(r)
        for (n, b, lo, hi, sigma), group in settings.items():
            base = _baseline(group)
            for r in group:
                rss = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
                if base is not None and r is not base:
                    ratios = (
                        f"×{r['time_ms'] / base['time_ms']:.2f} | "
                        f"×{r['saved_mb'] / base['saved_mb']:.2f}"
                    )
                else:
                    ratios = "baseline | baseline" if r is base else " | "
                out.append(
                    f"| N={n} B={b} d~U({lo:g},{hi:g}) σ={sigma:g} | {LABELS[r['model']]} | "
                    f"{r['time_ms']:.1f} | {r['saved_mb']:.2f} | {rss} | {ratios} |"
                )
    files.write_text(path, "\n".join(out) + "\n")


def cpu_name() -> str:
    """The CPU's model name, family and model numbers, widest vectors and L2/L3 sizes per
    ``/proc/cpuinfo`` and sysfs (e.g. ``AMD EPYC (family 25 model 17, AVX-512, L2 1024K,
    L3 32768K)``: a virtual machine's bare "AMD EPYC" names no generation, and the benchmarks'
    ratios depend on it), else :func:`platform.processor`."""
    try:
        first_cpu = (
            Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split("\n\n")[0]
        )
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in first_cpu.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "model name" not in fields:
        return platform.processor() or "unknown"
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = fields.get("flags", "").split()
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    details += [vectors] if vectors else []
    for level in (2, 3):
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            try:
                if (index / "level").read_text(encoding="ascii").strip() == str(level):
                    details.append(
                        f"L{level} {(index / 'size').read_text(encoding='ascii').strip()}"
                    )
                    break
            except OSError:
                continue
    name = fields["model name"]
    return f"{name} ({', '.join(details)})" if details else name

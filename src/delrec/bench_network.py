"""`delrec bench --network PRESET`: one training step of a preset's whole network, fused and
unfused, and where its time goes.

For the preset's network (:func:`delrec.models.preset_network`) as ``delrec``, ``rsnn`` and
``snn``, one training step (forward, the task's loss on random targets, backward; no optimizer)
at the preset's batch size and sequence length is timed with the network around the delays
fused and unfused (:func:`delrec.models.set_feedforward_engine`: ``"fused"`` or
``"reference"``; the recurrent layers run their default engine either way), one step of each in
turn, repeated (at least ``--repeats`` rotations, and more until the ``delrec`` fused step has
run for :data:`MIN_TIMED_S`, or :data:`QUICK_MIN_TIMED_S` with ``--quick``), median kept.
With ``--rate R`` every network first has its hidden layers' input currents scaled until each
fires ``R`` (:func:`calibrate`; fresh networks of some presets are silent). Then:

* each model's hidden-layer firing rates (:func:`firing_rates`);
* a per-component breakdown from one profiled step of each (torch.profiler): every operator's
  own time goes to the GEMMs (dense matrix products, wherever they run), or else to the
  component whose forward ran it or whose forward created the autograd node it runs for: spike
  products (:func:`delrec.engine.fused.linear` over the non-zero spikes), recurrent layer,
  feedforward spiking layers, dropout, normalisation, loss/readout, other;
* the floor: the network's dense matrix products, those of its unfused step, each replayed in
  isolation (same shapes and memory layouts) and summed; one floor for both rows of a model
  (the fused step replaces some of these products by spike products, which cost less);
* what dropout costs: the ``delrec`` fused step against the same network without dropout
  (every mask off), in the same rotation (the profile counts a mask drawn inside a layer's loop
  as that layer's work, so its dropout share is not the cost);
* on one thread, the ``delrec`` fused step also with subnormal floats kept instead of flushed
  to zero (:func:`delrec.cpu.flush_denormals`, which the command line sets), in the same
  rotation;
* PASS/FAIL lines for the whole-network targets (:func:`target_checks`), and a table, a CSV
  and a figure in ``--out``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from delrec import files
from delrec.bench import Log, cpu_name
from delrec.data import dataset_info, settings_of
from delrec.layers import DelRec
from delrec.layers.dropout import Dropout
from delrec.models import build_network, preset_network, set_feedforward_engine
from delrec.neurons import LeakyIntegrator, SequenceNeuron
from delrec.recipes import RECIPES
from delrec.training.objectives import make_objective

MODELS = ("delrec", "rsnn", "snn")
ENGINES = {"fused": "fused", "unfused": "reference"}  # column label -> feedforward engine


@dataclass(frozen=True)
class Shape:
    """A preset's training step: batch, steps, input kind and task."""

    batch: int
    steps: int
    inputs: str  # "spikes" (event counts), "pixels" (intensities in [0, 1]) or "series"
    task: str  # "classification" or "regression"


# each preset's kind of synthetic input
INPUTS = {"shd": "spikes", "ssc": "spikes", "psmnist": "pixels", "mackey-glass": "series"}
PRESETS = tuple(INPUTS)
SHD_STEPS = 100  # SHD's lengths vary from file to file; the bench times 100 bins of 10 ms


def shape_of(task: str) -> Shape:
    """The training step of ``task``'s recipe: its batch size, the data set's sequence length
    and task kind (no data is read)."""
    info = dataset_info(task)
    return Shape(RECIPES[task]["batch_size"], info.steps or SHD_STEPS, INPUTS[task], info.task)


QUICK_BATCH = 16
# the least time of the delrec fused step timed per preset (clock seconds), full and --quick
MIN_TIMED_S, QUICK_MIN_TIMED_S = 1.0, 0.25
SHD_TRAIN_FILES = 8156  # recordings in shd_train.h5


def shd_epoch_items() -> int:
    """The items of one SHD training epoch under the preset: the training files the
    validation split leaves (``data.valid_fraction``), each presented three times
    (augmentation)."""
    data = {**settings_of("shd"), **RECIPES["shd"].get("data", {})}
    held_out = round(data["valid_fraction"] * SHD_TRAIN_FILES)  # as delrec.data.heidelberg
    return 3 * (SHD_TRAIN_FILES - held_out)


COMPONENTS = (
    "GEMMs",
    "spike products",
    "recurrent layer",
    "feedforward spiking layers",
    "dropout",
    "normalisation",
    "loss/readout",
    "other",
)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# forward regions: modules (hooked by the benchmark) and the fused functions, by name
MODULE_COMPONENTS = (
    (DelRec, "recurrent layer"),
    (LeakyIntegrator, "loss/readout"),
    (SequenceNeuron, "feedforward spiking layers"),
    (nn.BatchNorm1d, "normalisation"),
    (Dropout, "dropout"),
)
FUNCTION_COMPONENTS = {
    "_SpikeLinear": "spike products",
    "delrec::nonzero_rows": "spike products",
    "_LIFLayer": "feedforward spiking layers",
    "_Integrator": "loss/readout",
    "_BatchNorm": "normalisation",
    "_Dropout": "dropout",
}
REGION = "delrec-bench: "


# --------------------------------------------------------------------------- one step
class TrainingStep:
    """One training step of ``network`` on random data of the preset's shape."""

    def __init__(self, network: nn.Module, shape: Shape, generator: torch.Generator):
        config = network.config
        steps, batch = shape.steps, shape.batch
        if shape.inputs == "spikes":
            frames = torch.rand(steps, batch, config.input_size, generator=generator) < 0.05
            self.frames = frames.float()
        elif shape.inputs == "pixels":
            self.frames = torch.rand(steps, batch, config.input_size, generator=generator)
        else:
            self.frames = torch.randn(steps, batch, config.input_size, generator=generator)
        self.lengths = torch.full((batch,), steps)
        if shape.task == "classification":
            self.targets = torch.randint(config.output_size, (batch,), generator=generator)
        else:
            self.targets = torch.randn(batch, generator=generator)
        self.network = network.train()
        self.objective = make_objective(shape.task, config.readout)

    def __call__(self) -> None:
        self.network.zero_grad(set_to_none=True)
        output = self.network(self.frames)
        with record_function(REGION + "loss/readout"):
            loss, _ = self.objective(output, self.lengths, self.targets)
        loss.backward()


# --------------------------------------------------------------------------- breakdown
class _Regions:
    """Forward hooks that run each component module's forward inside a labelled
    ``record_function`` region.

    On a fused network only the DelRec layers are hooked: the fused loops call no other module
    (their functions carry their own labels, :data:`FUNCTION_COMPONENTS`), and a hook on one
    would send its block through its modules (:func:`delrec.models.hooked`), profiling another
    path than the one timed."""

    def __init__(self, network: nn.Module):
        self.handles, self.open = [], []
        kinds = [
            (kind, label)
            for kind, label in MODULE_COMPONENTS
            if network.engine == "reference" or kind is DelRec
        ]
        for module in network.modules():
            label = next((c for kind, c in kinds if isinstance(module, kind)), None)
            if label is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter(label)))
                self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, label):
        def hook(module, args):
            region = record_function(REGION + label)
            region.__enter__()
            self.open.append(region)

        return hook

    def _exit(self, module, args, output):
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _label(event) -> str | None:
    if event.name.startswith(REGION):
        return event.name[len(REGION) :]
    return FUNCTION_COMPONENTS.get(event.name)


@contextlib.contextmanager
def _stderr_discarded():
    """Standard error (file descriptor 2, which C++ code writes to) sent to the null device for
    the block: for the profiler's start and stop, which its C++ logger announces there
    (``USDT: … profiler_start``), a line each, noise in the bench's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="ascii") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def breakdown(step: TrainingStep) -> dict[str, float]:
    """Milliseconds of one profiled step by component (module docstring)."""
    regions = _Regions(step.network)
    prof = profile(activities=[ProfilerActivity.CPU])
    try:
        with _stderr_discarded():
            prof.start()
        try:
            step()
        finally:
            with _stderr_discarded():
                prof.stop()
    finally:
        regions.remove()
    events = list(prof.events())

    def context(event) -> str | None:
        """The component of the innermost labelled forward region, or of the autograd node,
        that ``event`` runs in."""
        while event is not None:
            label = _label(event)
            if label is not None:
                return label
            if event.name.startswith("autograd::engine::evaluate_function"):
                return by_sequence.get(event.sequence_nr)
            event = event.cpu_parent
        return None

    by_sequence: dict[int, str] = {}
    for event in events:  # forward operators: the component that created their autograd node
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            label = context(event)
            if label is not None:
                by_sequence.setdefault(event.sequence_nr, label)
    totals = defaultdict(float)
    for event in events:
        component = "GEMMs" if event.name in GEMM_OPS else (context(event) or "other")
        totals[component] += event.self_cpu_time_total / 1e3
    return {c: totals[c] for c in COMPONENTS}


# --------------------------------------------------------------------------- GEMM floor
class _GemmRecorder(TorchDispatchMode):
    """Records the signature (operator, shapes and strides of every tensor argument) of each
    matrix product dispatched, from Python or from the C++ kernels."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (
            torch.ops.aten.mm,
            torch.ops.aten.addmm,
            torch.ops.aten.bmm,
            torch.ops.aten.baddbmm,
        ):
            tensors = tuple(
                (tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, Tensor)
            )
            out = tuple(
                (k, tuple(v.shape), v.stride(), v.dtype)
                for k, v in kwargs.items()
                if isinstance(v, Tensor)
            )
            self.calls[(func, tensors, out)] += 1
        return func(*args, **kwargs)


def _replay(signature, repeats: int, clock) -> float:
    """Seconds per call of one recorded matrix product on random tensors laid out the same."""
    func, tensors, out = signature

    def make(shape, stride, dtype):  # random storage seen through the recorded strides
        extent = 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride) if n > 0)
        return torch.randn(extent, dtype=dtype).as_strided(shape, stride)

    args = [make(*t) for t in tensors]
    kwargs = {k: make(shape, stride, dtype) for k, shape, stride, dtype in out}
    func(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = clock()
        func(*args, **kwargs)
        times.append(clock() - start)
    return statistics.median(times)


def gemm_floor(calls: Counter, clock, repeats: int = 5) -> float:
    """Milliseconds of a step's matrix products alone: every product that a
    :class:`_GemmRecorder` saw it dispatch, replayed in isolation, summed."""
    return 1e3 * sum(n * _replay(sig, repeats, clock) for sig, n in calls.items())


# --------------------------------------------------------------------------- firing rates
RATE_ITEMS = 32  # the batch items that firing rates are measured and calibrated on
MAX_RATE = 0.5
GAIN_RANGE = 2.0**12  # a calibration looks for a gain in [1/GAIN_RANGE, GAIN_RANGE]
GAIN_HALVINGS = 10  # bisection steps (in log2) once the target rate is bracketed


def _spike_rate(spikes: Tensor) -> float:
    """Spike events per neuron and step of a layer's output ``(T, B, N)`` (dropout scales kept
    spikes: events are counted, not their values)."""
    return float((spikes != 0).float().mean())


@torch.no_grad()
def firing_rates(network: nn.Module, frames: Tensor) -> list[float]:
    """Spike events per neuron and step of each hidden layer of ``network`` on the first
    :data:`RATE_ITEMS` items of ``frames`` ``(T, B, C)``, in training mode as the step runs."""
    _, spikes = network.forward_with_spikes(frames[:, :RATE_ITEMS])
    return [_spike_rate(s) for s in spikes]


def _current_parameters(block: nn.Module) -> list[Tensor]:
    """What a hidden block's input current is proportional to: BatchNorm's weight and bias where
    the block normalises (a normalised current ignores the synapses' scale), else the synapses'
    weight and bias."""
    layer = block.norm if block.norm is not None and block.norm.affine else block.synapses
    return [p for p in (layer.weight, layer.bias) if p is not None]


@torch.no_grad()
def calibrate(network: nn.Module, frames: Tensor, rate: float) -> list[float]:
    """Scale each hidden block's input current (:func:`_current_parameters`), first block first,
    until the block fires ``rate`` spike events per neuron and step (within 10 %, else a little
    more) on the first :data:`RATE_ITEMS` items of ``frames``; returns the gains. Fresh networks
    of some presets are silent (SSC's three layers), and a silent layer's spike products cost
    nothing: the step at trained rates costs more."""
    x = frames[:, :RATE_ITEMS]
    gains = []
    for index, block in enumerate(network.blocks):
        gains.append(_calibrate_block(block, x, rate, f"hidden layer {index + 1}"))
        x = block(x)
    return gains


def _calibrate_block(block: nn.Module, x: Tensor, rate: float, name: str) -> float:
    """The gain of ``block``'s input current that makes it fire ``rate`` on input ``x``, left
    applied (a bisection in log2); a ValueError when no gain up to :data:`GAIN_RANGE` does."""
    parameters = _current_parameters(block)
    originals = [p.clone() for p in parameters]

    def rate_at(gain: float) -> float:
        for parameter, original in zip(parameters, originals):
            parameter.copy_(original * gain)
        return _spike_rate(block(x))

    high = 1.0  # bracket the rate: low fires less, high at least as much
    while (reached := rate_at(high)) < rate:
        if high >= GAIN_RANGE:
            raise ValueError(
                f"{name} fires {reached:.1%} of its steps with its input current "
                f"×{GAIN_RANGE:g}, not {rate:.1%}: ask for a lower --rate"
            )
        high *= 2
    low = high / 2
    while low > 1 / GAIN_RANGE and rate_at(low) >= rate:
        low /= 2
    for _ in range(GAIN_HALVINGS):
        middle = math.sqrt(low * high)
        reached = rate_at(middle)
        if abs(reached - rate) <= 0.1 * rate:
            high = middle
            break
        low, high = (middle, high) if reached < rate else (low, middle)
    rate_at(high)
    return high


# --------------------------------------------------------------------------- the run
def measure(
    task: str, quick: bool, repeats: int, clock, log, rate: float | None = None
) -> list[dict]:
    """Rows (one per model and engine) of one preset; with ``rate``, every network calibrated
    to fire at that rate first (:func:`calibrate`)."""
    shape = shape_of(task)
    min_timed_s = QUICK_MIN_TIMED_S if quick else MIN_TIMED_S
    if quick:
        shape = Shape(QUICK_BATCH, shape.steps, shape.inputs, shape.task)
    steps, gemms = {}, {}  # gemms: the matrix products each model's unfused step dispatched
    rates = {}  # each model's hidden-layer firing rates (its two engines fire alike)
    for model in MODELS:
        for label, engine in ENGINES.items():
            network = build_network(preset_network(task, model), seed=0)
            set_feedforward_engine(network, engine)
            step = TrainingStep(network, shape, torch.Generator().manual_seed(0))
            if rate is not None:
                calibrate(network, step.frames, rate)
            if engine == "fused":
                rates[model] = firing_rates(network, step.frames)
            with _GemmRecorder() as recorder:  # the warm-up step (and any first build)
                step()
            steps[model, label] = step
            if engine == "reference":  # the network's dense products: the floor
                gemms[model] = recorder.calls
    # what dropout costs: the delrec fused step of the same network without it (every mask
    # off), whichever loop draws the masks (the profile counts a mask drawn inside a layer's
    # loop as that layer's work)
    without = build_network(
        preset_network(task, "delrec", dropout=0.0, recurrent_dropout=0.0), seed=0
    )
    steps["no dropout"] = TrainingStep(without, shape, torch.Generator().manual_seed(0))
    if rate is not None:
        calibrate(without, steps["no dropout"].frames, rate)
    steps["no dropout"]()
    # the delrec fused step once more with subnormal floats kept (the flag is per thread, so
    # only where the step runs on this thread alone, and only where flushing is on to begin with)
    subnormals = torch.get_num_threads() == 1 and torch.set_flush_denormal(True)
    times = defaultdict(list)

    def timed(key, step):
        start = clock()
        step()
        times[key].append(clock() - start)

    fused = ("delrec", "fused")
    others = [key for key in steps if key not in (fused, "no dropout")]
    # interleaved: one step of each in turn, at least `repeats` rotations and at least
    # min_timed_s of the delrec fused step (short steps get more rotations). The two steps whose
    # ratio is dropout's cost run first, back to back, in alternating order, so that neither
    # is always the one that follows the other (a short step runs faster on caches its
    # predecessor warmed); the subnormal step follows them
    while len(times[fused]) < repeats or sum(times[fused]) < min_timed_s:
        pair = [fused, "no dropout"] if len(times[fused]) % 2 == 0 else ["no dropout", fused]
        for key in pair:
            timed(key, steps[key])
        if subnormals:
            torch.set_flush_denormal(False)
            try:
                timed("subnormals kept", steps[fused])
            finally:
                torch.set_flush_denormal(True)
        for key in others:
            timed(key, steps[key])
    floors = {model: gemm_floor(calls, clock) for model, calls in gemms.items()}
    rows = []
    for key, step in steps.items():
        if key == "no dropout":
            continue
        model, label = key
        parts = breakdown(step)
        profiled = sum(parts.values())
        rows.append(
            {
                "preset": task,
                "batch": shape.batch,
                "steps": shape.steps,
                "model": model,
                "engine": label,
                "rotations": len(times[model, label]),
                "rotation_ms": " ".join(f"{1e3 * t:.3f}" for t in times[model, label]),
                "firing_rates": " ".join(f"{r:.4f}" for r in rates[model]),
                "step_ms": 1e3 * statistics.median(times[model, label]),
                "gemm_floor_ms": floors[model],
                "no_dropout_ms": (
                    1e3 * statistics.median(times["no dropout"])
                    if key == ("delrec", "fused")
                    else None
                ),
                # paired within each rotation (a minute apart at most), so that the load of
                # the machine, which drifts, cancels: the median of 1 - without/with
                "dropout_share": (
                    statistics.median(
                        1.0 - without / with_
                        for with_, without in zip(times[key], times["no dropout"])
                    )
                    if key == ("delrec", "fused")
                    else None
                ),
                "subnormals_kept_ms": (
                    1e3 * statistics.median(times["subnormals kept"])
                    if subnormals and key == ("delrec", "fused")
                    else None
                ),
                **{f"share_{c}": parts[c] / profiled for c in COMPONENTS},
            }
        )
    _print_rows(rows, log, rate)
    return rows


def _row(rows, task, model, engine):
    return next(r for r in rows if (r["preset"], r["model"], r["engine"]) == (task, model, engine))


def _print_rows(rows, log, rate: float | None = None) -> None:
    first = rows[0]
    log(
        f"\n{first['preset']}: B = {first['batch']}, T = {first['steps']}, "
        f"{first['rotations']} rotations"
    )
    how = (
        f"input currents scaled to fire {100 * rate:g} % (--rate {rate:g})"
        if rate is not None
        else "the preset's fresh weights"
    )
    silent = False
    for model in MODELS:
        rates = [
            float(r) for r in _row(rows, first["preset"], model, "fused")["firing_rates"].split()
        ]
        silent |= 0.0 in rates
        listed = ", ".join(f"{100 * r:.1f} %" for r in rates)
        log(f"  {model} firing rates of the hidden layers ({how}): {listed}")
    if silent:
        log(
            "  (a silent layer's spike products cost nothing, which a trained network's do not: "
            "--rate 0.1 times the step with every layer firing 10 %)"
        )
    short = ["GEMM", "spike", "rec", "ff", "drop", "norm", "loss", "other"]
    log(
        f"  {'model':7s} {'engine':8s} {'step ms':>9s} {'floor ms':>9s} {'×floor':>7s} "
        + " ".join(f"{s:>5s}" for s in short)
        + "   (shares of a profiled step, %)"
    )
    for r in rows:
        shares = " ".join(f"{100 * r[f'share_{c}']:5.1f}" for c in COMPONENTS)
        log(
            f"  {r['model']:7s} {r['engine']:8s} {r['step_ms']:9.1f} {r['gemm_floor_ms']:9.1f} "
            f"{r['step_ms'] / r['gemm_floor_ms']:7.2f} {shares}"
        )
    fused = _row(rows, first["preset"], "delrec", "fused")
    log(
        f"  delrec fused without dropout (every mask off): {fused['no_dropout_ms']:.1f} ms; "
        f"dropout is {100 * fused['dropout_share']:.1f} % of the step (median over the rotations)"
    )
    kept = fused["subnormals_kept_ms"]
    if kept is not None:
        log(
            f"  delrec fused with subnormal floats kept instead of flushed to zero: {kept:.1f} "
            f"ms, ×{kept / fused['step_ms']:.2f} the flushed step (delrec.cpu.flush_denormals)"
        )


def _spread(numerator: dict, denominator: dict) -> str:
    """The least and greatest ratio of two rows' steps within one rotation (the median ratio
    lies between them), e.g. ``"rotations ×0.72–×0.80"``."""
    ratios = [
        float(a) / float(b)
        for a, b in zip(numerator["rotation_ms"].split(), denominator["rotation_ms"].split())
    ]
    return f"rotations ×{min(ratios):.2f}–×{max(ratios):.2f}"


def target_checks(rows, presets, quick: bool, elapsed_s: float) -> list[str]:
    """PASS/FAIL lines for the whole-network targets, each with its measured ratio (a ratio of
    two steps also with its range over the rotations): the SHD fused step ≤ 0.5× the unfused
    one and ≤ 2.5× the network's GEMMs (the floor), SSC and PS-MNIST fused ≤ 0.6× unfused,
    every preset's delrec step ≤ 1.15× its rsnn step, dropout ≤ 5 % of the step; with
    ``quick``, the run under 2 minutes."""
    lines = [
        "Targets"
        + (" (quick: small batch; run without --quick for the real checks)" if quick else "")
    ]

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    for task in presets:
        fused = _row(rows, task, "delrec", "fused")
        unfused = _row(rows, task, "delrec", "unfused")
        ratio = fused["step_ms"] / unfused["step_ms"]
        limit = {"shd": 0.5, "ssc": 0.6, "psmnist": 0.6}.get(task)
        if limit is not None:
            lines.append(
                f"{verdict(ratio <= limit)}  {task} delrec: fused/unfused step ×{ratio:.2f} "
                f"({_spread(fused, unfused)}; target ≤ {limit})"
            )
        if task == "shd":
            floor = fused["step_ms"] / fused["gemm_floor_ms"]
            lines.append(
                f"{verdict(floor <= 2.5)}  {task} delrec: fused step / the network's GEMMs "
                f"×{floor:.2f} (target ≤ 2.5)"
            )
        rsnn = _row(rows, task, "rsnn", "fused")
        cost = fused["step_ms"] / rsnn["step_ms"]
        lines.append(
            f"{verdict(cost <= 1.15)}  {task}: delrec/rsnn fused step ×{cost:.2f} "
            f"({_spread(fused, rsnn)}; target ≤ 1.15)"
        )
        dropout = fused["dropout_share"]
        lines.append(
            f"{verdict(dropout <= 0.05)}  {task} delrec fused: dropout {100 * dropout:.1f} % of "
            "the step, against the same step without dropout (target ≤ 5 %)"
        )
    if quick:
        lines.append(
            f"{verdict(elapsed_s < 120)}  --quick ran in {elapsed_s:.0f} s (target < 120 s)"
        )
    return lines


def run(args) -> int:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    presets = PRESETS if args.network == "all" else (args.network,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log()

    log(
        f"delrec bench --network {args.network}{' --quick' if args.quick else ''}"
        f"{f' --rate {args.rate:g}' if args.rate is not None else ''}: torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), CPU {cpu_name()}, "
        f"{repeats} repeats or more (median; at least "
        f"{QUICK_MIN_TIMED_S if args.quick else MIN_TIMED_S:g} s of the delrec fused step per "
        f"preset), clock = {args.clock}"
    )
    log(
        "step = forward + loss + backward of the whole network; fused/unfused = the network "
        "around the delays on the fused loops or on autograd; floor = the network's GEMMs alone "
        "(its unfused step's)"
    )
    rows = []
    for task in presets:
        rows.extend(measure(task, args.quick, repeats, clock, log, args.rate))
    if "shd" in presets and not args.quick:
        batch = shape_of("shd").batch
        items = shd_epoch_items()
        steps = -(-items // batch)
        fused, unfused = (_row(rows, "shd", "delrec", e)["step_ms"] for e in ENGINES)
        log(
            f"\nSHD epoch ({items:,} items in {steps} training steps of "
            f"{batch}, delrec): {steps * fused / 1e3:.0f} s fused, "
            f"{steps * unfused / 1e3:.0f} s unfused (training steps only)"
        )
    log()
    for line in target_checks(rows, presets, args.quick, time.perf_counter() - started):
        log(line)
    _write_csv(rows, out / "network-bench.csv")
    _plot(rows, presets, out / "network-bench.png")
    files.write_text(out / "network-bench.txt", "\n".join(log.lines) + "\n")
    log(
        f"\nwrote {out / 'network-bench.csv'}, {out / 'network-bench.png'}, "
        f"{out / 'network-bench.txt'}"
    )
    return 0


def _write_csv(rows, path: Path) -> None:
    files.write_csv(path, rows, list(rows[0]))


def _plot(rows, presets, path: Path) -> None:
    plt = files.pyplot()

    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 4.2), squeeze=False)
    for ax, task in zip(axes[0], presets):
        bars = [r for r in rows if r["preset"] == task]
        labels = [f"{r['model']}\n{r['engine']}" for r in bars]
        bottom = [0.0] * len(bars)
        for colour, component in enumerate(COMPONENTS):
            heights = [r["step_ms"] * r[f"share_{component}"] for r in bars]
            ax.bar(labels, heights, bottom=bottom, color=f"C{colour}", label=component)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.scatter(
            labels,
            [r["gemm_floor_ms"] for r in bars],
            marker="_",
            s=400,
            color="k",
            label="the network's GEMMs alone (floor)",
            zorder=3,
        )
        ax.set_title(
            f"{task} (B = {bars[0]['batch']:.0f}, T = {bars[0]['steps']:.0f})", fontsize=10
        )
        ax.set_ylabel("ms per training step")
        ax.tick_params(axis="x", labelsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"delrec bench --network: one training step (CPU, torch {torch.__version__})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    files.write_figure(path, fig)
    plt.close(fig)

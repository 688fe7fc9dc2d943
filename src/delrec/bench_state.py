"""Benchmarks of state: the latency of streaming inference (``delrec bench --streaming``) and
the backward memory of truncated BPTT against the chunk length (``delrec bench --tbptt``).

Every figure is measured in this process, side by side, with the median of repeats; targets get
a PASS/FAIL line, and the output names the command that reproduces it. The command also writes
its figures, verdicts and log into ``streaming.md`` / ``tbptt.md`` in ``--out`` (the docs link
``docs/bench/``'s copies: figures are generated, never pasted).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from delrec import files
from delrec.bench import Log, command_line, cpu_name, git_describe
from delrec.deploy.streaming import StreamingNetwork
from delrec.layers import DelRec
from delrec.models import build_network, preset_network
from delrec.neurons import LIF
from delrec.training.objectives import make_objective
from delrec.training.tbptt import truncated_bptt

STEP_TARGET_US = 100.0  # one step of the SHD network at batch 1 on one thread
CHUNK_TARGET = 3.0  # a chunk of 10 steps against one step
ENGINES = {True: "compiled loop", False: "PyTorch ops (`DELREC_NATIVE=0`)"}  # by compiled_loops


def peak_saved_bytes(run) -> int:
    """The most bytes of distinct storages that autograd holds for backward at any one time
    while ``run()`` executes (a storage counts while a saved tensor of it is alive)."""
    live: dict[int, list[int]] = {}  # storage address -> [saved tensors alive, bytes]
    held = {"now": 0, "peak": 0}

    class Saved:
        __slots__ = ("tensor", "key")

        def __init__(self, tensor):
            storage = tensor.untyped_storage()
            self.tensor, self.key = tensor, storage.data_ptr()
            entry = live.setdefault(self.key, [0, storage.nbytes()])
            if entry[0] == 0:
                held["now"] += entry[1]
                held["peak"] = max(held["peak"], held["now"])
            entry[0] += 1

        def __del__(self):
            entry = live[self.key]
            entry[0] -= 1
            if entry[0] == 0:
                held["now"] -= entry[1]
                del live[self.key]

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        run()
    return held["peak"]


def median_us(run, count: int, repeats: int, clock) -> float:
    """Median over ``repeats`` of the time per call of ``run(i)``, ``count`` calls each, µs."""
    for i in range(min(count, 20)):
        run(i)
    times = []
    for _ in range(repeats):
        start = clock()
        for i in range(count):
            run(i)
        times.append((clock() - start) / count * 1e6)
    return sorted(times)[len(times) // 2]


@contextmanager
def compiled_loops(enabled: bool):
    """Run with the compiled loops (``DELREC_NATIVE=1``) or with PyTorch ops only."""
    saved = os.environ.get("DELREC_NATIVE")
    os.environ["DELREC_NATIVE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DELREC_NATIVE"]
        else:
            os.environ["DELREC_NATIVE"] = saved


def shd_like_network(seed: int = 0, density: float = 0.05) -> tuple[nn.Module, torch.Tensor]:
    """The SHD preset network (140 → 256 → 256 recurrent, axonal delays → 20) in eval mode,
    its BatchNorm statistics taken from sparse random input (each channel active with
    probability ``density`` per step) as training would, and a 4000-step input of that kind."""
    generator = torch.Generator().manual_seed(seed)
    net = build_network(preset_network("shd", "delrec"), seed=seed)
    calibration = (torch.rand(250, 32, 140, generator=generator) < density).float()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = None  # the mean over the calibration passes
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(calibration)
    stream = (torch.rand(4000, 1, 140, generator=generator) < density).float()
    return net.eval(), stream


def streaming(clock_name: str, repeats: int, log) -> tuple[list[str], list[str]]:
    """Per-step latency at batch 1 and chunk throughput of the SHD network: the verdicts and a
    markdown table of the figures."""
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    net, x = shd_like_network()
    with torch.no_grad():
        _, spikes = net.forward_with_spikes(x[:250])
    rates = ", ".join(f"{float(s.mean()):.3f}" for s in spikes)
    log(f"SHD network (delrec preset, axonal delays), batch 1, firing rates per layer: {rates}")
    frames = [x[i] for i in range(x.shape[0])]  # (1, 140) each
    chunks = [x[i : i + 10] for i in range(0, x.shape[0] - 9, 10)]
    results = {}

    def measure() -> tuple[float, float, float]:
        stream = StreamingNetwork.from_network(net)
        state = stream.initial_state(1)
        step = median_us(lambda i: stream.step(frames[i % len(frames)], state), 400, repeats, clock)
        chunk = median_us(
            lambda i: stream.advance(chunks[i % len(chunks)], state), 100, repeats, clock
        )
        check = median_us(lambda i: stream.refresh(), 400, repeats, clock)
        return step, chunk, check

    for compiled in (True, False):
        with compiled_loops(compiled):
            step, chunk, check = measure()
        results[compiled] = step, chunk
        name = ENGINES[compiled].replace("`", "")
        log(f"  {name:32s} one step {step:8.1f} µs   chunk of 10 steps {chunk:8.1f} µs")
    log(f"  of each call, the check for edits of the stream (refresh): {check:.1f} µs")
    with torch.no_grad():
        whole = median_us(lambda i: net(x[:250]), 3, repeats, clock) / 250
    log(f"  {'net.eval() on 250 steps, per step':32s} {whole:8.1f} µs")
    table = [
        "| engine | one step (µs) | a chunk of 10 steps (µs) | chunk / step |",
        "|---|---:|---:|---:|",
        *(
            f"| {ENGINES[compiled]} | {step:.1f} | {chunk:.1f} | {chunk / step:.2f}× |"
            for compiled, (step, chunk) in results.items()
        ),
        f"| `net.eval()` on 250 steps, per step | {whole:.1f} | | |",
    ]
    step, chunk = results[True]
    return [
        verdict(
            step <= STEP_TARGET_US,
            f"one streaming step of the SHD network at batch 1: {step:.1f} µs "
            f"(target ≤ {STEP_TARGET_US:.0f} µs, clock = {clock_name})",
        ),
        verdict(
            chunk <= CHUNK_TARGET * step,
            f"a chunk of 10 steps: {chunk:.1f} µs = {chunk / step:.2f}× one step "
            f"(target ≤ {CHUNK_TARGET:.0f}×)",
        ),
    ], table


def tbptt(
    clock_name: str, repeats: int, log, batch: int = 16, seeds: int = 2
) -> tuple[list[str], list[str]]:
    """Backward memory and time of a truncated-BPTT training step of the PS-MNIST network
    (784 steps) against the chunk length, and how often float32 chunks differ from one pass
    (:func:`float32_chunks` on ``seeds`` seeds): the verdicts on memory ∝ K and a markdown
    table of the figures."""
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    generator = torch.Generator().manual_seed(0)
    net = build_network(preset_network("psmnist", "delrec"), seed=0).train()
    frames = torch.rand(784, batch, 1, generator=generator)
    lengths = torch.full((batch,), 784)
    targets = torch.randint(0, 10, (batch,), generator=generator)
    objective = make_objective("classification", "sum")
    log(f"PS-MNIST network (delrec preset: 1 → 64 → 212 → 212 recurrent → 10), batch {batch}")

    def full_bptt():
        output, _ = net.forward_with_spikes(frames)
        objective(output, lengths, targets)[0].backward()

    def chunked(k):
        return lambda: truncated_bptt(net, frames, lengths, targets, objective, k).backward()

    rows = [("full BPTT", 784, full_bptt)] + [
        (f"tbptt={k}", k, chunked(k)) for k in (49, 98, 196, 392, 784)
    ]
    peaks = {}
    table = [
        "| `tbptt` | chunk K | kept for backward (MB) | per step of a chunk (kB) "
        "| one training step (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, k, run in rows:
        peak = peak_saved_bytes(run)
        seconds = median_us(lambda i, run=run: run(), 1, repeats, clock) / 1e6
        peaks[name] = peak
        table.append(
            f"| {'none (full BPTT)' if name == 'full BPTT' else k} | {k} "
            f"| {peak / 1e6:.1f} | {peak / k / 1e3:.1f} | {seconds:.2f} |"
        )
        log(
            f"  {name:10s} K = {k:3d}   saved for backward {peak / 1e6:7.1f} MB "
            f"({peak / k / 1e3:6.1f} kB per step of a chunk)   step {seconds:6.2f} s"
        )
    float32_chunks(log, seeds)
    chunks = {k: peaks[f"tbptt={k}"] for k in (49, 98, 196, 392)}  # several chunks each
    per_step, constant = linear_fit(chunks)
    worst = max(abs(constant + per_step * k - peak) / peak for k, peak in chunks.items())
    log(
        f"  fit over K < 784: saved = {constant / 1e6:.1f} MB + {per_step / 1e3:.1f} kB · K "
        f"(full BPTT: {peaks['full BPTT'] / 784 / 1e3:.1f} kB per step of the sequence)"
    )
    return [
        verdict(
            worst <= 0.01 and 0 <= constant < chunks[49] / 2,
            f"backward memory = constant + {per_step / 1e3:.1f} kB per step of the chunk: "
            f"largest deviation from the line {100 * worst:.2f} % (target ≤ 1 %), constant "
            f"{constant / 1e6:.1f} MB (target < half of tbptt=49's)",
        ),
        verdict(
            abs(peaks["tbptt=784"] - peaks["full BPTT"]) <= 0.01 * peaks["full BPTT"],
            "one chunk as long as the sequence holds what full BPTT holds (within 1 %)",
        ),
    ], table


def linear_fit(values: dict[int, float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ``values[k]`` against ``k``."""
    ks, ys = list(values), list(values.values())
    mean_k, mean_y = sum(ks) / len(ks), sum(ys) / len(ys)
    slope = sum((k - mean_k) * (y - mean_y) for k, y in zip(ks, ys)) / sum(
        (k - mean_k) ** 2 for k in ks
    )
    return slope, mean_y - slope * mean_k


def float32_chunks(log, seeds: int = 2, steps: int = 784, chunk: int = 49) -> None:
    """How often float32 chunks on the LIF training paths differ from one pass: DelRec layers of
    the PS-MNIST size (N = 212, batch 16, delays ~ |N(0, 12²)|, learned spreads) in training
    mode with a fixed dropout mask, axonal and synaptic, σ = 10 and 1, hard and soft reset."""
    samples = flipped = runs = 0
    for seed in range(seeds):
        for delay_type in ("axonal", "synaptic"):
            for sigma in (10.0, 1.0):
                for reset in (0.0, None):
                    g = torch.Generator().manual_seed(seed)
                    layer = DelRec(
                        212,
                        LIF(tau=2.0, v_reset=reset),
                        delay_type=delay_type,
                        delay_init="half_normal:12",
                        sigma=sigma,
                        learn_spread=True,
                        generator=g,
                    )
                    x = torch.randn(steps, 16, 212, generator=g) * 0.7 + 0.3
                    mask = (torch.rand(16, 212, generator=g) < 0.8).float() / 0.8
                    with torch.no_grad():
                        whole = layer(x, dropout_mask=mask)
                        state, pieces = None, []
                        for start in range(0, steps, chunk):
                            first = {"dropout_mask": mask} if state is None else {}
                            piece, state = layer(
                                x[start : start + chunk], state, return_state=True, **first
                            )
                            pieces.append(piece)
                    differ = (torch.cat(pieces) != whole).any(0).any(-1)  # (B,)
                    samples += differ.numel()
                    flipped += int(differ.sum())
                    runs += 1
    boundaries = samples * (-(-steps // chunk) - 1)
    log(
        f"  float32, training mode, chunks of {chunk} of {steps} steps on the LIF fast paths "
        f"({runs} layers): {flipped} of {samples} samples' spike trains differ from one pass "
        f"({flipped} flips in {boundaries} chunk boundaries)"
    )


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def write_report(path: Path, title: str, command: str, commit: str, elapsed_s: float, body):
    """``path`` (markdown): how the figures were made (command, commit, date, machine, load),
    then ``body`` (verdicts, tables, log)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"# {title}",
        "",
        "Generated by the command below; do not edit by hand, rerun it to refresh.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| commit | `{commit}` |",
        f"| date | {when} |",
        f"| CPU | {cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end |",
        f"| threads | {torch.get_num_threads()} torch thread(s) |",
        f"| software | torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} |",
        f"| run time | {elapsed_s / 60:.1f} min |",
        "",
    ]
    files.write_text(path, "\n".join(head + body) + "\n")


def run(args) -> int:
    """``delrec bench --streaming`` / ``--tbptt``: print the measurements and verdicts, and
    write them into ``streaming.md`` / ``tbptt.md`` in ``args.out``."""

    started, commit = time.perf_counter(), git_describe()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or 5
    command = command_line(args)
    log = Log()

    log(
        f"{command}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}, clock = {args.clock}, "
        f"median of {repeats}"
    )
    verdicts, table = (streaming if args.streaming else tbptt)(args.clock, repeats, log)
    for line in verdicts:
        log(line)
    if args.streaming:
        name, title = "streaming.md", "`delrec bench --streaming` results"
        what = (
            "Streaming inference of the SHD network (`delrec` preset: 140 → 256 → 256 "
            "recurrent, axonal delays → 20, BatchNorm statistics of sparse random input) at "
            "batch 1 through `StreamingNetwork`: `step` of one frame and `advance` of a chunk "
            f"of 10 frames, time per call ({args.clock} clock), median over {repeats} repeats."
        )
    else:
        name, title = "tbptt.md", "`delrec bench --tbptt` results"
        what = (
            "One training step (forward, loss, backward) of the PS-MNIST network (`delrec` "
            "preset, 784 steps, batch 16) with `--set tbptt=K` against full BPTT: the bytes "
            f"autograd keeps for backward at its peak and the time ({args.clock} clock), "
            f"median over {repeats} repeats."
        )
    body = [what, "", "## Targets", "", *(f"- {line}" for line in verdicts), ""]
    body += ["## Figures", "", *table, "", "## Log", "", "```", *log.lines, "```"]
    path = Path(args.out) / name
    write_report(path, title, command, commit, time.perf_counter() - started, body)
    print(f"\nwrote {path}")
    return 0

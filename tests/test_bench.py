"""`delrec bench` on a tiny grid: every model measured, targets judged, skips said, files
written."""

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from delrec import bench
from delrec.cli import main


def tiny_grids(quick):
    size_panel = [bench.Setting(8, 2, 3, 1), bench.Setting(16, 2, 3, 1)]
    delay_panel = [bench.Setting(8, 2, 3, 1), bench.Setting(8, 2, 6, 1)]
    cost = [bench.Setting(8, 2, d, s) for d in (3, 6) for s in (0, 1)]
    return (
        size_panel,
        delay_panel,
        cost,
        bench.Setting(8, 2, 6, 1, min_delay=2),
        [bench.Setting(8, 2, 3, 1), bench.Setting(8, 2, 30, 1)],
    )


def test_bench_writes_the_four_panels_and_judges_the_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "STEPS", 6)
    monkeypatch.setattr(bench, "grids", tiny_grids)
    monkeypatch.setattr(
        bench, "feedforward_grid", lambda quick: [bench.Setting(8, 2, d, 0) for d in (3, 30)]
    )
    monkeypatch.setattr(bench, "MAX_MACS", 2 * 3 * 6 * 2 * 8**2 * 10)  # the reference: N = 8 only
    assert main(["bench", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    rows = list(csv.DictReader(open(tmp_path / "bench.csv", encoding="utf-8")))
    size_models = {(r["size"], r["model"]) for r in rows if r["panel"] == "size"}
    assert {m for n, m in size_models if n == "8"} == set(bench.MODELS)
    assert ("16", "reference") not in size_models and "reference loop skipped at N=16" in printed
    assert ("16", "fast-synaptic") in size_models  # the C++ slot kernels: never skipped
    assert all(float(r["time_ms"]) > 0 and float(r["saved_mb"]) > 0 for r in rows)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert (tmp_path / "bench.txt").read_text().count("\n") > 20
    report = (tmp_path / "bench.md").read_text()  # says how it was made, embeds the figure
    rerun = f"delrec bench --quick --out {tmp_path} --repeats 1 --threads 1 --clock wall"
    assert f"| command | `{rerun}` |" in report and "![delrec bench](bench.png)" in report
    assert all(f"| {key} |" in report for key in ("commit", "date", "CPU", "threads", "software"))
    assert (
        torch.__version__ in report and "| N=16 B=2 d~U(0,3) σ=1 | DelRec, reference" not in report
    )
    assert (
        report.count("| N=8 B=2 d~U(0,3) σ=1 | vanilla recurrent LIF |") == 3
    )  # size, delay, cost

    verdicts = [line for line in printed.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert sum("cost of delays" in v for v in verdicts) == 4
    # each verdict judges the ratio measured in bench.csv, whichever way it goes
    cost = {
        (float(r["max_delay"]), float(r["sigma"]), r["model"]): float(r["time_ms"])
        for r in rows
        if r["panel"] == "cost"
    }
    cost_lines = [v for v in verdicts if "cost of delays" in v]
    for setting, line in zip(tiny_grids(True)[2], cost_lines):
        key = (float(setting.max_delay), float(setting.sigma))
        ratio = cost[(*key, "fast")] / cost[(*key, "vanilla")]
        assert f"×{ratio:.2f} (target ≤ 1.5)" in line and setting.describe() in line, line
        assert line.startswith("PASS" if ratio <= 1.5 else "FAIL"), line
    assert sum("memory saved for backward" in v for v in verdicts) == 2
    assert any("flat in the delay" in v for v in verdicts)  # the fast engine keeps the same bytes
    assert any("SHD setting" in v for v in verdicts)
    assert sum("synaptic vs axonal N=8" in v for v in verdicts) == 4  # time and memory ×2
    assert any("synaptic delays N=8: saved memory flat in the delay range" in v for v in verdicts)
    assert sum("feedforward delays N=8" in v for v in verdicts) == 5  # time, memory ×2; flat
    assert any("saved memory flat in the window" in v for v in verdicts)
    assert "feedforward-delay convolution skipped at N=8 B=2 d~U(0,30)" in printed
    assert "torch " in printed and "thread(s)" in printed


def test_without_the_kernels_the_synaptic_lag_gemm_is_skipped_where_too_costly(monkeypatch):
    monkeypatch.setattr(bench, "MAX_MACS", 2 * 3 * bench.STEPS * 2 * 8**2 * 10)
    small, large = bench.Setting(8, 2, 3, 1), bench.Setting(16, 2, 3, 1)
    assert bench.skip_reason("fast-synaptic", large) is None  # the slot kernels run at any size
    monkeypatch.setattr(bench.native, "load", lambda name: None)
    assert bench.skip_reason("fast-synaptic", small) is None
    assert "synaptic engine skipped at N=16" in bench.skip_reason("fast-synaptic", large)


def test_network_bench_times_breaks_down_and_judges_every_model(tmp_path, monkeypatch, capsys):
    from delrec import bench_network
    from delrec.engine import fused

    shape_of = bench_network.shape_of
    monkeypatch.setattr(
        bench_network, "shape_of", lambda t: dataclasses.replace(shape_of(t), steps=8)
    )
    monkeypatch.setattr(bench_network, "QUICK_BATCH", 3)
    monkeypatch.setattr(fused, "MIN_ROWS", 1)  # spike products on 8·3 frames
    # one repeat asked, but a step of a few milliseconds rotates until 0.05 s of it are timed
    monkeypatch.setattr(bench_network, "QUICK_MIN_TIMED_S", 0.05)
    args = ["bench", "--network", "shd", "--quick", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out

    rows = list(csv.DictReader(open(tmp_path / "network-bench.csv", encoding="utf-8")))
    assert {(r["model"], r["engine"]) for r in rows} == {
        (m, e) for m in bench_network.MODELS for e in bench_network.ENGINES
    }
    by = {(r["model"], r["engine"]): r for r in rows}
    rotations = {int(r["rotations"]) for r in rows}
    assert len(rotations) == 1 and rotations.pop() > 1
    assert f"{by['delrec', 'fused']['rotations']} rotations" in printed
    for r in rows:
        shares = [float(r[f"share_{c}"]) for c in bench_network.COMPONENTS]
        assert abs(sum(shares) - 1) < 1e-9 and float(r["step_ms"]) > 0
        assert 0 < float(r["gemm_floor_ms"]) and float(r["share_GEMMs"]) > 0
    # every component lands where it runs, fused or not
    assert float(by["snn", "fused"]["share_recurrent layer"]) == 0
    assert float(by["delrec", "fused"]["share_recurrent layer"]) > 0
    # the floor: the network's dense products (the unfused step's), one per model
    assert by["delrec", "fused"]["gemm_floor_ms"] == by["delrec", "unfused"]["gemm_floor_ms"]
    assert float(by["snn", "fused"]["share_spike products"]) > 0  # the sparse input, at least
    assert float(by["snn", "unfused"]["share_spike products"]) == 0
    for engine in bench_network.ENGINES:
        for component in ("feedforward spiking layers", "normalisation", "loss/readout"):
            assert float(by["snn", engine][f"share_{component}"]) > 0, (engine, component)
    assert float(by["delrec", "unfused"]["share_dropout"]) > 0
    # dropout's cost: the same fused step without any mask, timed beside it
    assert float(by["delrec", "fused"]["no_dropout_ms"]) > 0
    assert -1 < float(by["delrec", "fused"]["dropout_share"]) < 1
    assert by["delrec", "unfused"]["no_dropout_ms"] == ""
    assert "without dropout" in printed
    verdicts = [line for line in printed.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert any("fused/unfused" in v for v in verdicts) and any(
        "network's GEMMs" in v for v in verdicts
    )
    assert any("delrec/rsnn" in v for v in verdicts) and any("--quick ran" in v for v in verdicts)
    # a ratio of two steps with its range over the rotations, which holds the median ratio
    for pair, words in (
        (("delrec", "unfused"), "fused/unfused"),
        (("rsnn", "fused"), "delrec/rsnn"),
    ):
        times = [
            [float(t) for t in by[key]["rotation_ms"].split()]
            for key in (("delrec", "fused"), pair)
        ]
        assert len(times[0]) == len(times[1]) == int(by["delrec", "fused"]["rotations"])
        ratios = [a / b for a, b in zip(*times)]
        line = next(v for v in verdicts if words in v)
        spread = f"rotations ×{min(ratios):.2f}–×{max(ratios):.2f}"
        assert spread in line, (spread, line)
        median = float(by["delrec", "fused"]["step_ms"]) / float(by[pair]["step_ms"])
        assert min(ratios) - 1e-9 <= median <= max(ratios) + 1e-9
    assert (tmp_path / "network-bench.png").stat().st_size > 10_000
    assert "fused/unfused" in (tmp_path / "network-bench.txt").read_text()
    # each model's firing rates, as the fresh weights give them
    for model in bench_network.MODELS:
        rates = [float(r) for r in by[model, "fused"]["firing_rates"].split()]
        assert len(rates) == 2 and all(0 <= r <= 1 for r in rates)
        assert by[model, "fused"]["firing_rates"] == by[model, "unfused"]["firing_rates"]
        line = f"{model} firing rates of the hidden layers (the preset's fresh weights): "
        assert line + ", ".join(f"{100 * r:.1f} %" for r in rates) in printed


def test_network_bench_says_when_a_layer_is_silent_and_times_it_firing_with_rate(
    tmp_path, monkeypatch, capsys
):
    """Fresh SSC networks are silent: the bench says what that hides and how to see it; with
    `--rate 0.1` every layer of every model fires about 10 %, and the log says so."""
    from delrec import bench_network

    shape_of = bench_network.shape_of
    monkeypatch.setattr(
        bench_network, "shape_of", lambda t: dataclasses.replace(shape_of(t), steps=12)
    )
    monkeypatch.setattr(bench_network, "QUICK_BATCH", 4)
    monkeypatch.setattr(bench_network, "QUICK_MIN_TIMED_S", 0.0)
    args = ["bench", "--network", "ssc", "--quick", "--repeats", "1", "--out", str(tmp_path)]
    hint = "--rate 0.1 times the step with every layer firing 10 %"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "delrec firing rates of the hidden layers (the preset's fresh weights): 0.0 %" in printed
    assert hint in printed
    assert main([*args, "--rate", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("delrec bench --network ssc --quick --rate 0.1:")
    assert hint not in printed
    rows = list(csv.DictReader(open(tmp_path / "network-bench.csv", encoding="utf-8")))
    for row in rows:
        assert all(0.08 <= float(r) <= 0.125 for r in row["firing_rates"].split()), row
    label = "firing rates of the hidden layers (input currents scaled to fire 10 % (--rate 0.1))"
    assert printed.count(label) == len(bench_network.MODELS)


def test_a_calibrated_network_fires_at_the_rate_asked_in_every_layer():
    """`--rate`: the fresh SSC network is silent; calibrated, each of its layers fires the
    rate asked, on the items the bench measures, whether the gain had to rise or fall."""
    from delrec import bench_network, models

    shape = bench_network.Shape(8, 30, "spikes", "classification")
    for preset, rate in (("ssc", 0.1), ("shd", 0.03)):
        network = models.build_network(models.preset_network(preset), seed=0)
        step = bench_network.TrainingStep(network, shape, torch.Generator().manual_seed(0))
        before = bench_network.firing_rates(network, step.frames)
        assert preset != "ssc" or max(before) == 0  # silent when fresh
        gains = bench_network.calibrate(network, step.frames, rate)
        after = bench_network.firing_rates(network, step.frames)
        assert len(gains) == len(after) == len(network.blocks)
        for fresh, gain, reached in zip(before, gains, after):
            assert (gain > 1) == (fresh < rate), (preset, fresh, gain)
            assert 0.8 * rate <= reached <= 1.25 * rate, (preset, reached)


def test_a_layer_that_cannot_fire_at_the_rate_is_named():
    """A layer without input and bias never fires, however its current is scaled."""
    from delrec import bench_network, models

    network = models.build_network(models.preset_network("mackey-glass"), seed=0)
    frames = torch.zeros(20, 4, network.config.input_size)
    with pytest.raises(ValueError, match="hidden layer 1 fires 0.0% .*×4096, not 5.0%: ask"):
        bench_network.calibrate(network, frames, 0.05)


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_the_profiled_step_runs_the_path_that_was_timed(monkeypatch, engine):
    """The breakdown's labels must not send a fused network through its modules."""
    from delrec import bench_network, models
    from delrec.engine import fused

    network = models.build_network(models.preset_network("shd"), seed=0)
    models.set_feedforward_engine(network, engine)
    shape = bench_network.Shape(3, 6, "spikes", "classification")
    step = bench_network.TrainingStep(network, shape, torch.Generator().manual_seed(0))
    calls = []
    lif_layer = fused.lif_layer
    monkeypatch.setattr(fused, "lif_layer", lambda *a, **k: calls.append(1) or lif_layer(*a, **k))
    shares = bench_network.breakdown(step)
    assert len(calls) == (1 if engine == "fused" else 0)
    assert shares["feedforward spiking layers"] > 0 and shares["recurrent layer"] > 0


def test_the_profiled_step_keeps_its_stderr_but_not_the_profilers_log_lines(capfd):
    """torch's profiler logs a line to standard error as it starts and stops (``USDT: …
    profiler_start``), noise in the bench's output; what the step itself writes there stays."""
    from delrec import bench_network, models

    network = models.build_network(models.preset_network("mackey-glass"), seed=0)
    shape = bench_network.Shape(3, 6, "series", "regression")
    step = bench_network.TrainingStep(network, shape, torch.Generator().manual_seed(0))

    class Loud:
        network = step.network

        def __call__(self):
            print("said by the step", file=sys.stderr, flush=True)
            step()

    bench_network.breakdown(Loud())
    err = capfd.readouterr().err
    assert "said by the step" in err and "profiler_st" not in err, err


SETTINGS = tiny_grids(True)
COST, SHD, SYNAPTIC = SETTINGS[2], SETTINGS[3], SETTINGS[4]
DELAYS = SETTINGS[1]


def measurements(cost_ratio, saved_ratio, flat, shd_time, shd_saved, growth, synaptic_ratio):
    """Rows as `delrec bench` writes them, with the given ratios to the baseline of each target
    (saved memory growing with the delay unless ``flat``)."""
    found = {}
    for s in COST:
        found["cost", "fast", s] = (cost_ratio, saved_ratio * (1 if flat else 1 + s.max_delay))
        found["cost", "vanilla", s] = (1.0, 1.0 if flat else 1 + s.max_delay)
    found["shd", "reference", SHD] = (shd_time, shd_saved)
    found["shd", "fast", SHD] = (1.0, 1.0)
    for s, g in zip(DELAYS, growth):
        found["delay", "reference", s] = (g, g)
        found["delay", "fast", s] = (1.0, 1.0)
    for s in SYNAPTIC:
        growing = 1 if flat else 1 + s.max_delay
        found["synaptic", "fast", s] = (1.0, growing)
        found["synaptic", "fast-synaptic", s] = (synaptic_ratio, saved_ratio * growing)
    return [
        {**dataclasses.asdict(setting), "panel": panel, "model": model, "time_ms": t, "saved_mb": m}
        for (panel, model, setting), (t, m) in found.items()
    ]


def verdicts_of(rows):
    lines = bench.target_checks(rows, COST, SHD, quick=True)
    assert lines[0].startswith("Targets")
    lines = lines[1:] + bench.synaptic_checks(rows, SYNAPTIC)
    return [line.split()[0] for line in lines], lines


def test_targets_pass_at_their_bounds_and_fail_beyond():
    """The judgement itself, on made-up measurements: every target passes exactly at its
    bound and fails just beyond it (4 cost lines, 2 memory lines, 2 SHD, growth; synaptic:
    time and memory of 2 settings, memory flat in the delay range)."""
    at_bounds = measurements(1.5, 1.0, True, 5.0, 10.0, (2.0, 3.0), 4.0)
    verdicts, lines = verdicts_of(at_bounds)
    assert verdicts == ["PASS"] * 14, lines
    assert "×1.50 (target ≤ 1.5)" in lines[0] and "flat in the delay" in lines[4]
    assert "time ×4.00 (target ≤ 4)" in lines[9] and "saved memory flat" in lines[-1]
    beyond = measurements(1.51, 1.01, False, 4.9, 9.9, (3.0, 2.0), 4.1)
    verdicts, lines = verdicts_of(beyond)
    assert verdicts == ["FAIL"] * 14, lines
    assert "NOT flat in the delay" in lines[4] and "time ×4.10 (target ≤ 4)" in lines[9]
    assert "saved memory NOT flat" in lines[-1]


def test_targets_of_sections_that_did_not_run_say_so():
    """`--sections size` judges no target: the heading says so rather than standing alone."""
    lines = bench.target_checks([], [], bench.Setting(256, 32, 10, 5), quick=True)
    assert lines[1:] == ["(none among the sections that ran)"]


def test_streaming_and_tbptt_benchmarks_measure_and_judge(monkeypatch, capsys, tmp_path):
    """`delrec bench --streaming` (its compiled and PyTorch-op paths on an active network) and
    the TBPTT memory benchmark on a batch of one say what they measured and judge the targets
    (not asserted to pass: timings depend on the machine); the command writes its figures,
    verdicts and rerun command into streaming.md."""
    from delrec import bench_state

    out = tmp_path / "out"
    args = ["bench", "--streaming", "--repeats", "1", "--clock", "cpu", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rates = printed.split("firing rates per layer: ")[1].splitlines()[0].split(", ")
    assert all(float(rate) > 0.01 for rate in rates)  # the benchmark network is active
    assert "compiled loop" in printed and "DELREC_NATIVE=0" in printed
    assert printed.count("µs") >= 5 and printed.startswith("delrec bench --out")
    verdicts = [line for line in printed.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 2 and "chunk of 10 steps" in verdicts[1]
    report = (out / "streaming.md").read_text()
    command = report.split("| command | `")[1].split("`")[0].split()
    assert command[:2] == ["delrec", "bench"] and "--streaming" in command
    assert " ".join(command).count("--clock cpu") == 1
    assert all(f"- {line}" in report for line in verdicts)
    figures = report.split("## Figures")[1].split("## Log")[0]
    assert "| compiled loop | " in figures and "| PyTorch ops (`DELREC_NATIVE=0`) | " in figures

    lines = []
    verdicts, table = bench_state.tbptt("cpu", 1, lines.append, batch=1, seeds=0)
    assert len(lines) == 9 and "tbptt=49" in lines[2] and "fit over K < 784" in lines[-1]
    assert len(verdicts) == 2 and all(v.startswith(("PASS", "FAIL")) for v in verdicts)
    assert len(table) == 2 + 6 and table[2].startswith("| none (full BPTT) | 784 |")


def test_bench_runs_the_feedforward_section_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "STEPS", 6)
    monkeypatch.setattr(
        bench, "feedforward_grid", lambda quick: [bench.Setting(8, 2, d, 0) for d in (3, 9)]
    )
    argv = ["bench", "--quick", "--repeats", "1", "--sections", "feedforward"]
    (tmp_path / "bench.png").write_bytes(b"an earlier run's figure")
    assert main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    rows = list(csv.DictReader(open(tmp_path / "bench.csv", encoding="utf-8")))
    assert {r["panel"] for r in rows} == {"feedforward"}
    assert {r["model"] for r in rows} == {"feedforward", "ff-delay", "ff-conv"}
    assert "C++ feedforward kernels run here with" in printed
    verdicts = [line for line in printed.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 5 and all("feedforward delays N=8" in v for v in verdicts)
    assert not (tmp_path / "bench.png").exists()  # no Fig. S1 panels ran: none left either
    report = (tmp_path / "bench.md").read_text()
    rerun = f"delrec bench --quick --sections feedforward --out {tmp_path} --repeats 1"
    assert f"| command | `{rerun} --threads 1 --clock wall` |" in report
    assert "bench.png" not in report and report.count("feedforward delays N=8") == 5
    assert main(["bench", "--sections", "cost", "--device", "cuda"]) == 2
    assert "--sections picks sections of the CPU layer benchmark" in capsys.readouterr().err


def test_bench_checks_its_counts_and_output_folder_before_measuring(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, problem in [
        (["--threads", "0"], "--threads must be in 1…"),
        (["--threads", "100000"], "this machine's cores"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--out", str(afile / "sub")], "afile is a file, not a folder"),
    ]:
        assert main(["bench", "--quick", "--sections", "shd", *argv]) == 2, argv
        assert problem in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_refuses_an_empty_out_and_a_broken_link_before_measuring(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # an empty --out would write here
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("measured"))
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for out, problem in [
        ("", "--out is empty: give the folder"),
        ("gone", "gone is a broken symbolic link (to "),
        ("gone/sub", "gone is a broken symbolic link"),
    ]:
        assert main(["bench", "--quick", "--sections", "shd", "--out", out]) == 2, out
        assert problem in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone"]


def test_a_gpu_bench_stopped_midway_says_its_files_are_incomplete(tmp_path, monkeypatch):
    """The GPU benchmark rewrites its files after every setting; until the last, they say how
    far it got, and the targets it has not reached are "not measured yet", not FAIL."""
    from delrec import bench_gpu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench_gpu.gpu, "offer_interpreted_paths", lambda: None)
    measured = []

    def measure(s, models, repeats, device, log):  # made-up rows; stopped at the `stop`-th
        if len(measured) == stop:
            raise KeyboardInterrupt
        measured.append(s)
        row = {"time_ms": 1.0, "peak_mb": None, "samples_per_s": 1.0}
        return [{**dataclasses.asdict(s), "model": m, **row} for m in models]

    monkeypatch.setattr(bench_gpu, "measure", measure)
    argv = ["bench", "--device", "cuda", "--dry-run", "--quick", "--out", str(tmp_path)]
    stop = 1
    assert main(argv) == 130
    report = (tmp_path / "gpu-bench.md").read_text()
    assert report.startswith("# INCOMPLETE (1 of 7 settings measured so far) delrec bench")
    assert report.count("not measured yet (the run had not reached it)") == 5
    assert "a model failed" not in report
    assert len(list(csv.DictReader(open(tmp_path / "gpu-bench.csv", encoding="utf-8")))) == 3

    measured.clear()
    stop = None
    assert main(argv) == 0
    report = (tmp_path / "gpu-bench.md").read_text()
    assert report.startswith("# delrec bench --device cuda (dry run)")
    assert "INCOMPLETE" not in report and "not measured yet" not in report
    targets = report[report.index("Targets (dry run") :]
    assert "n/a " in targets and "FAIL  " not in targets and "PASS  " not in targets


def test_a_gpu_bench_whose_model_failed_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    """A model that fails is reported FAILED and the rest runs, but the command no longer
    ends with exit 0 as if everything had been measured."""
    from delrec import bench_gpu

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench_gpu.gpu, "offer_interpreted_paths", lambda: None)

    def measure(s, models, repeats, device, log):  # the first model of every setting fails
        row = {"time_ms": 1.0, "peak_mb": None, "samples_per_s": 1.0}
        return [{**dataclasses.asdict(s), "model": m, **row} for m in models[1:]]

    monkeypatch.setattr(bench_gpu, "measure", measure)
    argv = ["bench", "--device", "cuda", "--dry-run", "--quick", "--out", str(tmp_path)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "7 measurement(s) failed (FAILED above): triton at axonal" in out, out[-2000:]


def test_the_gpu_dry_run_interprets_the_kernels_when_started_from_the_shell(tmp_path):
    """From the command line, without TRITON_INTERPRET in the environment: every Triton
    kernel ran interpreted (triton, imported by torch, used to compile them for a GPU and
    every Triton model FAILED, with exit 0)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["bench", "--device", "cuda", "--dry-run", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "delrec", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "FAILED" not in output, output[-3000:]


def test_the_benchmark_scripts_run_end_to_end_at_tiny_sizes(tmp_path):
    """They are not part of `delrec bench`; this keeps them from rotting (what they measure at
    these sizes means nothing)."""
    tiny = ["--size", "16", "--batch", "2", "--steps", "6", "--repeats", "1", "--threads", "1"]
    log = tmp_path / "spike-products.txt"
    small = ["--rows", "40", "--layers", "8:70", "--densities", "0.1", "--repeats", "1"]
    small += ["--out", str(log)]
    for script, args, expected in [
        ("bench_checks.py", tiny, "every check costs at most 5% of its work"),
        ("bench_synaptic.py", [*tiny, "--max-delay", "5"], "x axonal"),
        ("bench_spike_products.py", small, "the spike products run only where"),
    ]:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / script), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert expected in done.stdout and "Traceback" not in done.stderr, (script, done.stderr)
    assert (
        expected in log.read_text()
        and "$ python benchmarks/bench_spike_products.py" in log.read_text()
    )


def test_bench_refuses_options_its_benchmark_would_ignore(capsys):
    for argv, problem in [
        (["--streaming", "--quick"], "--streaming and --tbptt have one size, no quick grid"),
        (["--tbptt", "--quick"], "--streaming and --tbptt have one size, no quick grid"),
        (["--device", "cuda", "--dry-run", "--clock", "cpu"], "leave out --threads and --clock"),
        (["--rate", "0.1"], "use it with --network"),
        (["--network", "ssc", "--rate", "0"], "in (0, 0.5]; got 0"),
        (["--network", "ssc", "--rate", "0.7"], "in (0, 0.5]; got 0.7"),
        (["--network", "ssc", "--rate", "nan"], "in (0, 0.5]; got nan"),
    ] + [  # (a machine of one core refuses --threads 2 earlier)
        (["--device", "cuda", "--dry-run", "--threads", "2"], "leave out --threads and --clock")
    ] * ((os.cpu_count() or 1) > 1):
        assert main(["bench", *argv]) == 2, argv
        assert problem in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_the_machine_line_names_the_cpu_generation_and_its_vectors():
    """A virtual machine's model name can be a bare "AMD EPYC": the bench's machine line adds
    the family and model numbers and the widest vectors, which the ratios depend on."""
    from delrec.bench import cpu_name

    first_cpu = Path("/proc/cpuinfo").read_text(encoding="utf-8").split("\n\n")[0]
    fields = {}
    for line in first_cpu.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "model name" not in fields:
        pytest.skip("this /proc/cpuinfo names no model (e.g. ARM)")
    name = cpu_name()
    assert name.startswith(fields["model name"])
    if "cpu family" in fields:
        assert f"family {fields['cpu family']} model {fields['model']}" in name
    flags = fields.get("flags", "").split()
    if "avx512f" in flags:
        assert "AVX-512" in name
    elif "avx2" in flags:
        assert "AVX2" in name


def test_the_shd_epoch_counts_the_training_split_of_the_preset(tmp_path, monkeypatch):
    """The epoch line counted all 8,156 files of shd_train.h5 three times (96 steps of 256),
    though the preset holds a fifth of them out for validation (77 steps). Checked on a file of
    40 recordings against the training loader the preset builds."""
    from test_train_run import write_random_shd

    from delrec import bench_network
    from delrec.config import resolve
    from delrec.runs import load_splits

    write_random_shd(tmp_path / "shd_train.h5", 40, seed=1)
    write_random_shd(tmp_path / "shd_test.h5", 4, seed=2)
    monkeypatch.setattr(bench_network, "SHD_TRAIN_FILES", 40)
    config = resolve(task="shd", flags={"data_root": str(tmp_path)})
    assert len(load_splits(config).datasets["train"]) == bench_network.shd_epoch_items() == 96
    monkeypatch.setattr(bench_network, "SHD_TRAIN_FILES", 8156)
    assert bench_network.shd_epoch_items() == 3 * 6525

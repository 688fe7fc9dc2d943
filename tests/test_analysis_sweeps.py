"""Sweep drivers and `delrec compare`, end to end on the embedded digits-8x8 with tiny runs."""

import csv
import json
import shutil
from types import SimpleNamespace

import pytest

from delrec.analysis.compare import Row, unlabelled_differences
from delrec.analysis.sweeps import rate_points
from delrec.cli import main
from delrec.config import resolve
from delrec.training.evaluation import evaluate_run

TINY = ["--epochs", "1", "--set", "max_train_samples=32"]


def _rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


@pytest.fixture(scope="module")
def params_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "params"
    status = main(
        ["sweep", "params", "--models", "snn,delrec", "--sizes", "4,8", "--out", str(out), *TINY]
    )
    return status, out


def test_parameter_sweep_trains_every_point_and_writes_table_and_figure(params_sweep, capsys):
    status, out = params_sweep
    assert status == 0
    rows = {(r["model"], r["label"]): r for r in _rows(out / "table.csv")}
    # digits-8x8: 1 input, N hidden, 10 classes; SNN 12N + 10; DelRec adds W (N²), delays (N)
    # and spread logits (N)
    expected = {("snn", 4): 58, ("snn", 8): 106, ("delrec", 4): 82, ("delrec", 8): 186}
    for (model, size), count in expected.items():
        label = {"snn": "SNN", "delrec": "DelRec"}[model] + f" (hidden_sizes=[{size}])"
        row = rows[(model, label)]
        assert int(row["parameters"]) == count and int(row["seeds"]) == 1
        assert 0 <= float(row["accuracy_mean"]) <= 1 and float(row["firing_rate"]) >= 0
        assert row["recurrent_delays"] == str(model == "delrec")
        assert (row["rounding_cost_mean"] == "") == (model == "snn")  # nothing to round
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.md").read_text()
    assert table.startswith("| Model | Rec. | Rec. Delays | Ff. Delays | LIF | Param | Seeds |")
    assert table.count("\n") == 2 + 4


def test_a_sweep_never_answers_with_points_of_other_settings(params_sweep, capsys):
    _, out = params_sweep
    base = ["sweep", "params", "--models", "snn", "--out", str(out), "--rounded-only"]
    for changed, differ in [
        (["--epochs", "2", "--set", "max_train_samples=32"], "epochs differ"),
        ([*TINY, "--seeds", "0-1"], "seeds [0]"),
        ([*TINY, "batch_size=16"], "batch_size differ"),
    ]:
        assert main([*base, "--sizes", "4", *changed]) == 2
        err = capsys.readouterr().err
        assert "sweep point snn-h4" in err and "was trained with other settings" in err, err
        assert differ in err, err
    for duplicate in (["--sizes", "4,4"], ["--models", "snn,snn", "--sizes", "4"]):
        assert main([*base, *duplicate, *TINY]) == 2
        assert "distinct" in capsys.readouterr().err


def test_a_point_folder_of_another_kind_is_refused_and_an_unstarted_one_trained(tmp_path, capsys):
    """A single run (or other files) where a point goes is not taken for the point; a folder
    left with nothing but lock files by a sweep killed while starting is trained afresh."""
    out = tmp_path / "sweep"
    sweep = ["sweep", "params", "--models", "snn", "--sizes", "4", "--out", str(out), *TINY]
    run = ["train", "--task", "digits-8x8", "--model", "snn", "--no-progress", *TINY]
    assert main([*run, "network.hidden_sizes=[4]", "--run-dir", str(out / "snn-h4")]) == 0
    capsys.readouterr()
    assert main([*sweep, "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert f"sweep point snn-h4: {out / 'snn-h4'} holds a run of one seed" in err, err
    assert "seeds.json" in err and "move" in err

    shutil.rmtree(out / "snn-h4")
    (out / "snn-h4" / "seed-0").mkdir(parents=True)
    (out / "snn-h4" / "run.lock").touch()
    (out / "snn-h4" / "seed-0" / "run.lock").touch()
    assert main(["train", "--resume", str(out / "snn-h4")]) == 2
    assert "holds no run yet" in capsys.readouterr().err
    assert main([*sweep, "--rounded-only"]) == 0
    assert json.loads((out / "snn-h4" / "summary.json").read_text())["status"] == "complete"


def test_running_a_finished_sweep_again_trains_nothing(params_sweep, capsys):
    _, out = params_sweep
    before = (out / "snn-h4" / "summary.json").stat().st_mtime_ns
    assert (
        main(
            [
                "sweep",
                "params",
                "--models",
                "snn,delrec",
                "--sizes",
                "4,8",
                "--out",
                str(out),
                "--rounded-only",
                *TINY,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "sweep point" not in captured.err and "| SNN (hidden_sizes=[4]) |" in captured.out
    assert (out / "snn-h4" / "summary.json").stat().st_mtime_ns == before


def test_rate_sweep_resumes_an_interrupted_point_and_plots_rate(tmp_path, capsys):
    out = tmp_path / "rate"
    interrupted = out / "delrec-rate-0"
    assert (
        main(
            [
                "train",
                "--task",
                "digits-8x8",
                "--seeds",
                "0",
                "--epochs",
                "2",
                "--max-epochs-this-run",
                "1",
                "--run-dir",
                str(interrupted),
                "--no-progress",
                "--set",
                "max_train_samples=32",
                "rate_penalty=0.0",
            ]
        )
        == 0
    )
    assert not (interrupted / "summary.json").exists()
    assert (
        main(
            [
                "sweep",
                "rate",
                "--penalties",
                "0,10",
                "--out",
                str(out),
                "--epochs",
                "2",
                "--set",
                "max_train_samples=32",
                "--rounded-only",
            ]
        )
        == 0
    )
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["runs"][0]["epochs_done"] == 2
    rows = _rows(out / "table.csv")
    assert sorted(r["label"] for r in rows) == [
        "DelRec (rate_penalty=0.0)",
        "DelRec (rate_penalty=10.0)",
    ]
    # --rounded-only measured no real-valued delays: nothing stands in their column
    assert all(r["accuracy_mean"] == "" and r["rounded_accuracy_mean"] != "" for r in rows)
    table = (out / "table.md").read_text().splitlines()
    assert all(line.split(" | ")[7] == "–" for line in table[2:]), table
    assert (out / "figure.png").stat().st_size > 1000


def test_compare_groups_seeds_and_single_runs_of_one_configuration(tmp_path, capsys):
    common = [
        "--task",
        "digits-8x8",
        "--model",
        "delrec",
        "--no-progress",
        *TINY,
        "network.hidden_sizes=[8]",
    ]
    assert main(["train", "--seeds", "0,1", "--run-dir", str(tmp_path / "pair"), *common]) == 0
    assert main(["train", "--seed", "5", "--run-dir", str(tmp_path / "single"), *common]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                str(tmp_path / "pair"),
                str(tmp_path / "single"),
                "--csv",
                str(tmp_path / "t.csv"),
                "--markdown",
                str(tmp_path / "t.md"),
                "--figure",
                str(tmp_path / "t.png"),
            ]
        )
        == 0
    )
    (row,) = _rows(tmp_path / "t.csv")
    assert row["label"] == "DelRec" and int(row["seeds"]) == 3
    accuracies = [
        json.loads((tmp_path / d / "test_results.json").read_text())["accuracy"]
        for d in ("pair/seed-0", "pair/seed-1", "single")
    ]
    assert float(row["rounded_accuracy_mean"]) == pytest.approx(sum(accuracies) / 3)
    assert float(row["rounding_cost_mean"]) == pytest.approx(
        float(row["accuracy_mean"]) - float(row["rounded_accuracy_mean"])
    )
    assert "| DelRec | ✓ | ✓ |  | ✓ | 186 | 3 |" in (tmp_path / "t.md").read_text()
    # a run named twice, or a copy of a run (one configuration, one seed), is not two seeds
    assert main(["compare", str(tmp_path / "single"), str(tmp_path / "single")]) == 2
    assert "single is named twice" in capsys.readouterr().err
    shutil.copytree(tmp_path / "pair" / "seed-1", tmp_path / "copy")
    assert main(["compare", str(tmp_path / "pair"), str(tmp_path / "copy")]) == 2
    assert "are one configuration with one seed (1)" in capsys.readouterr().err
    # the figure's format follows its name
    single = ["compare", str(tmp_path / "single"), "--rounded-only", "--figure"]
    assert main([*single, str(tmp_path / "t.pdf")]) == 0
    assert (tmp_path / "t.pdf").read_bytes()[:5] == b"%PDF-"
    assert main([*single, str(tmp_path / "t.txt")]) == 2
    assert "give a file name ending in .png, .pdf, .svg" in capsys.readouterr().err


def test_compare_names_settings_the_rows_differ_in_beyond_their_models():
    """Four models trained with a cosine schedule and DelRec with the preset's one-cycle one
    were ranked in one table labelled by model alone. What a preset sets per model (the
    vanilla RSNN's gradient clipping) and what the labels show are no such difference."""

    def row(model, label, shown=(), **changes):
        overrides = [f"{key}={value}" for key, value in changes.items()]
        config = resolve(task="shd", model=model, overrides=overrides).to_dict()
        return Row(label, [SimpleNamespace(config=config)], shown)

    assert unlabelled_differences([row("delrec", "DelRec"), row("rsnn", "RSNN")]) == []
    cosine = {"optim.scheduler": "cosine"}
    rows = [row("fixed", "Fixed", **cosine), row("rsnn", "RSNN", **cosine), row("delrec", "DelRec")]
    assert unlabelled_differences(rows) == [
        'optim.scheduler: "cosine" in Fixed, RSNN; "onecycle" in DelRec'
    ]
    assert unlabelled_differences([row("fixed", "F", **cosine), row("rsnn", "R", **cosine)]) == []
    sizes = {"network.hidden_sizes": "[8,8]"}
    shown = ("network.hidden_sizes",)  # a sweep of sizes: the labels name them
    swept = [row("delrec", "D (8)", shown, **sizes), row("delrec", "D (256)", shown)]
    assert unlabelled_differences(swept) == []
    # labelled among DelRec's rows, but the SNN row's own value is in no label
    rates = [row("delrec", f"D (lr={lr})", ("optim.lr",), **{"optim.lr": lr}) for lr in (1, 2)]
    assert unlabelled_differences([*rates, row("snn", "SNN", **{"optim.lr": 5})]) == [
        "optim.lr: 1.0 in D (lr=1); 2.0 in D (lr=2); 5.0 in SNN"
    ]


def test_compare_names_what_is_not_a_finished_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    run = tmp_path / "half"
    assert (
        main(
            [
                "train",
                "--task",
                "digits-8x8",
                "--seed",
                "0",
                "--epochs",
                "2",
                "--max-epochs-this-run",
                "1",
                "--run-dir",
                str(run),
                "--no-progress",
                "--set",
                "max_train_samples=32",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["compare", str(run)]) == 2
    assert f"delrec train --resume {run}" in capsys.readouterr().err


def test_sweep_rejects_an_unknown_model_and_an_empty_out(tmp_path, capsys, monkeypatch):
    assert main(["sweep", "params", "--models", "lstm", "--out", str(tmp_path)]) == 2
    assert "--models" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # argparse's own exit
        main(["sweep", "models", "--out", ""])
    assert stop.value.code == 2 and list(tmp_path.iterdir()) == []
    assert "argument --out: is empty: give the sweep's folder" in capsys.readouterr().err


def test_a_sweep_into_the_folder_of_a_training_run_is_refused(params_sweep, capsys):
    """It wrote its point folders, tables and figure among the run's own files."""
    _, out = params_sweep
    for run in (out / "snn-h4", out / "snn-h4" / "seed-0"):  # of seeds, and of one seed
        before = sorted(run.rglob("*"))
        assert main(["sweep", "models", "--models", "snn", "--out", str(run), *TINY]) == 2
        assert f"--out {run} is the folder of a training run" in capsys.readouterr().err
        assert sorted(run.rglob("*")) == before


def test_compare_refuses_a_run_whose_config_was_edited(params_sweep, tmp_path, capsys):
    """It read the row's settings from config.json alone: a run showed under settings it was
    not trained with (another task, a negative epoch count, another width)."""
    _, out = params_sweep
    for key, value, shown in [
        ("epochs", -1, "epochs: -1 in config.json, 1 in the checkpoint"),
        ("task", "mackey-glass", 'task: "mackey-glass" in config.json'),
    ]:
        run = tmp_path / key
        shutil.copytree(out / "snn-h4" / "seed-0", run)
        document = json.loads((run / "config.json").read_text(encoding="utf-8"))
        document["config"][key] = value
        (run / "config.json").write_text(json.dumps(document), encoding="utf-8")
        assert main(["compare", str(run), "--rounded-only"]) == 2
        err = capsys.readouterr().err
        assert "config.json does not describe the network its best checkpoint holds" in err
        assert shown in err, err
    assert main(["compare", str(out / "snn-h4"), "--rounded-only"]) == 0


def test_every_point_is_checked_before_the_first_is_trained(tmp_path, capsys):
    out = tmp_path / "rate"
    argv = ["sweep", "rate", "--model", "snn", "--penalties", "0,nan", "--out", str(out), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sweep point snn-rate-nan: rate_penalty must be a finite number" in err, err
    assert not out.exists()  # the good point 0 was not trained first
    huge = "4,3000000"  # 9e12 recurrent weights: more memory than any machine has
    sizes = ["sweep", "params", "--models", "rsnn", "--sizes", huge, "--out", str(out), *TINY]
    assert main(sizes) == 2
    err = capsys.readouterr().err
    assert "sweep point rsnn-h3000000: the network's weights do not fit in the memory of" in err
    assert not out.exists()


def test_rate_points_of_distinct_penalties_have_distinct_names():
    names = [p.name for p in rate_points("delrec", [0.0, 1.0, 10.0, 1e-5, 0.1, 0.1000001])]
    assert names == [
        "delrec-rate-0",
        "delrec-rate-1",
        "delrec-rate-10",
        "delrec-rate-1e-05",
        "delrec-rate-0.1",
        "delrec-rate-0.1000001",
    ]


def test_model_sweep_runs_each_model_on_the_task_network_then_analyze_training(tmp_path, capsys):
    out = tmp_path / "models"
    tiny = [
        "--epochs",
        "1",
        "--rounded-only",
        "--set",
        "max_train_samples=32",
        "network.hidden_sizes=[4]",
    ]
    assert main(["sweep", "models", "--models", "snn,ffdelay", "--out", str(out), *tiny]) == 0
    rows = {r["model"]: r for r in _rows(out / "table.csv")}
    assert {m: r["label"] for m, r in rows.items()} == {"snn": "SNN", "ffdelay": "Ff. delays"}
    assert rows["ffdelay"]["feedforward_delays"] == "True" and int(rows["snn"]["seeds"]) == 1
    capsys.readouterr()

    figure = tmp_path / "training.png"
    argv = ["analyze", "training", str(out / "snn"), str(out / "ffdelay"), "--figure", str(figure)]
    assert main([*argv, "--labels", "SNN,FF"]) == 0
    printed = capsys.readouterr().out
    assert "SNN: 1 epochs, last valid accuracy" in printed and "FF: 1 epochs" in printed
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert main([*argv, "--labels", "one"]) == 2
    error = capsys.readouterr().err
    assert "--labels names 1 runs" in error and "give 2 labels in that order" in error
    assert str(out / "snn" / "seed-0") in error  # the runs it counted, by folder
    assert main([*argv, "--labels", "x,x"]) == 2
    assert "each run needs a label of its own" in capsys.readouterr().err
    pdf = ["analyze", "training", str(out / "snn"), "--figure", str(tmp_path / "t.pdf")]
    assert main(pdf) == 0 and (tmp_path / "t.pdf").read_bytes()[:5] == b"%PDF-"
    assert main([*pdf[:-1], str(tmp_path / "t.xyz")]) == 2
    assert "give a file name ending in .png, .pdf, .svg" in capsys.readouterr().err
    run_figure = next((out / "snn").rglob("*.png"))  # a figure the run wrote: never replaced
    before = run_figure.read_bytes()
    assert main([*pdf[:-1], str(run_figure)]) == 2
    assert "a file of the run being read" in capsys.readouterr().err
    assert run_figure.read_bytes() == before
    metrics = out / "snn" / "seed-0" / "metrics.csv"
    whole = metrics.read_text()
    for epoch in ("abc", "nan", "inf", "-inf", "1.5"):
        metrics.write_text(whole.replace("\n1,", f"\n{epoch},", 1))
        assert main(pdf) == 2, epoch
        err = capsys.readouterr().err
        assert f"metrics.csv line 2, column epoch: '{epoch}' is not a whole number" in err, err


@pytest.mark.parametrize(
    "sweep, setting, option",
    [
        (["models", "--models", "snn"], "task=shd", "--task"),
        (["models", "--models", "snn"], "model=rsnn", "--models"),
        (["models", "--models", "snn"], "seed=7", "--seeds"),
        (["params", "--models", "snn", "--sizes", "16"], "network.hidden_sizes=[8]", "--sizes"),
        (["rate", "--penalties", "0"], "rate_penalty=5", "--penalties"),
        (["rate", "--penalties", "0"], "model=snn", "--model"),
    ],
)
def test_a_sweep_refuses_a_set_of_its_own_settings(tmp_path, capsys, sweep, setting, option):
    """Each point gets these from the sweep: a --set of them would be overridden unseen."""
    out = tmp_path / "sweep"
    assert main(["sweep", *sweep, "--out", str(out), "--set", setting]) == 2
    assert f"give it with {option}" in capsys.readouterr().err
    assert not out.exists()


def test_compare_reevaluates_learned_feedforward_positions(tmp_path, capsys):
    """Feedforward positions are delays a chip runs rounded, so `ffdelay` gets the real-valued
    test metric (as `delrec eval --spread`) and a rounding cost, as DelRec does."""
    run = tmp_path / "ff"
    common = ["--no-progress", *TINY, "network.hidden_sizes=[8]"]
    assert (
        main(
            ["train", "--task", "digits-8x8", "--model", "ffdelay", "--run-dir", str(run), *common]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["compare", str(run), "--csv", str(tmp_path / "t.csv")]) == 0
    (row,) = _rows(tmp_path / "t.csv")
    assert row["label"] == "Ff. delays" and row["rounding_cost_mean"] != ""
    real = evaluate_run(run, split="test", spread=True)["accuracy"]
    rounded = json.loads((run / "test_results.json").read_text())["accuracy"]
    assert float(row["accuracy_mean"]) == pytest.approx(real)
    assert float(row["rounding_cost_mean"]) == pytest.approx(real - rounded)


def test_compare_reevaluates_from_data_that_moved_with_data_root(tmp_path, capsys):
    """A learned-delay run is re-evaluated on its test data: once the data set's files moved,
    compare names the fix, and `--data-root` finds them (as eval's does)."""
    from test_train_run import write_random_shd

    root = tmp_path / "shd"
    root.mkdir()
    write_random_shd(root / "shd_train.h5", 24, seed=1)
    write_random_shd(root / "shd_test.h5", 12, seed=2)
    run = tmp_path / "run"
    settings = ["network.hidden_sizes=[6,6]", "batch_size=12"]
    argv = ["train", "--task", "shd", "--data-root", str(root), "--epochs", "1"]
    assert main([*argv, "--run-dir", str(run), "--no-progress", "--set", *settings]) == 0
    moved = root.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["compare", str(run), "--csv", str(tmp_path / "t.csv")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["compare", str(run), "--data-root", str(moved), "--device", "cpu"]) == 0
    assert (
        main(["compare", str(run), "--csv", str(tmp_path / "t.csv"), "--data-root", str(moved)])
        == 0
    )
    (row,) = _rows(tmp_path / "t.csv")
    real = evaluate_run(run, split="test", spread=True, data_root=str(moved))["accuracy"]
    assert row["rounding_cost_mean"] != "" and float(row["accuracy_mean"]) == pytest.approx(real)


def test_a_sweep_notes_the_settings_a_points_model_does_not_use(tmp_path, capsys, monkeypatch):
    """As `delrec train` does, once per point before any training (snn has no delays)."""
    from delrec.analysis import sweeps

    def no_training(*args):
        raise KeyboardInterrupt  # the notes come first: nothing needs to train

    monkeypatch.setattr(sweeps, "train_point", no_training)
    out = tmp_path / "sweep"
    argv = ["sweep", "params", "--models", "snn,delrec", "--sizes", "4", "--out", str(out)]
    assert main([*argv, *TINY, "network.delay_init=uniform:0:5"]) == 130
    err = capsys.readouterr().err
    note = "note: network.delay_init='uniform:0:5' does nothing for the snn model"
    assert f"{note}; config.json records it as given (sweep point snn-h4)" in err, err
    assert err.count("does nothing") == 1  # delrec uses it

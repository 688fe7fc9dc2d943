"""`delrec analyze training` and its figure: every line named, whatever the runs' layers."""

import json

import pytest

from delrec.cli import main
from delrec.config import preset
from delrec.training.figures import training_dynamics

NO_MARKER = (None, "", " ", "None", "none")


def _rows(epochs: int, hidden_layers: int) -> list[dict]:
    """Rows of a ``metrics.csv`` as read back (strings), one per epoch."""
    layers = [str(i) for i in range(hidden_layers)]
    return [
        {
            "epoch": str(epoch),
            "train_loss": str(2.0 / epoch),
            "valid_accuracy": str(0.1 * epoch),
            **{f"firing_rate_{i}": str(0.1 + 0.01 * int(i)) for i in layers},
            **{f"grad_norm_{name}": str(1.0 + epoch) for name in [*layers, "readout"]},
        }
        for epoch in range(1, epochs + 1)
    ]


def _write_run(path, rows: list[dict]) -> None:
    """A run directory as `analyze training` reads it: config.json (of a classification
    task, as the rows' valid_accuracy says) and metrics.csv."""
    path.mkdir(parents=True)
    config = preset("digits-8x8", "delrec").to_dict()
    (path / "config.json").write_text(json.dumps({"config": config}))
    lines = [",".join(rows[0])] + [",".join(row.values()) for row in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")


def _legend(ax) -> dict[str, tuple]:
    """Legend label → (linestyle, marker) of its handle."""
    legend = ax.get_legend()
    return {
        text.get_text(): (handle.get_linestyle(), handle.get_marker())
        for text, handle in zip(legend.get_texts(), legend.legend_handles)
    }


def test_every_layer_line_is_named_by_the_legends_whatever_the_layer_counts(tmp_path):
    runs = {"one layer": _rows(3, 1), "three layers": _rows(2, 3)}
    fig = training_dynamics(runs, "accuracy", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    valid_ax, _, rate_ax, grad_ax = fig.axes
    run_colours = {
        text.get_text(): handle.get_color()
        for text, handle in zip(
            valid_ax.get_legend().get_texts(), valid_ax.get_legend().legend_handles
        )
    }
    assert list(run_colours) == list(runs) and len(set(run_colours.values())) == 2
    drawn = {  # the lines of each panel, in drawing order: (run, layer name in the legend)
        rate_ax: [("one layer", "layer 0")] + [("three layers", f"layer {i}") for i in range(3)],
        grad_ax: [("one layer", "layer 0"), ("one layer", "readout")]
        + [("three layers", name) for name in ("layer 0", "layer 1", "layer 2", "readout")],
    }
    for ax, lines in drawn.items():
        legend = _legend(ax)
        assert sorted(legend) == sorted({layer for _, layer in lines})
        assert len(set(legend.values())) == len(legend)  # no two layers drawn alike
        assert len(ax.get_lines()) == len(lines)
        for line, (run, layer) in zip(ax.get_lines(), lines):
            assert line.get_color() == run_colours[run]
            assert (line.get_linestyle(), line.get_marker()) == legend[layer], (run, layer)


def test_a_run_of_one_epoch_is_drawn_with_markers(tmp_path):
    fig = training_dynamics({"short": _rows(1, 2)}, "accuracy", tmp_path / "t.png")
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 2 + 2 + 3  # validation, loss, 2 firing rates, 3 gradient norms
    for line in lines:
        assert len(line.get_xdata()) == 1 and line.get_marker() not in NO_MARKER
    markers = {line.get_marker() for line in fig.axes[3].get_lines()}
    assert len(markers) == 3  # one point per layer: told apart by its marker alone


@pytest.mark.parametrize("twice", ["s1", "./s1", "{tmp}/s1"])
def test_a_run_named_twice_is_refused_as_such(tmp_path, capsys, monkeypatch, twice):
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path / "s1", _rows(1, 1))
    argv = ["analyze", "training", "s1", twice.format(tmp=tmp_path), "--figure", "t.png"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("delrec analyze training: error: the run s1 is named twice"), err
    assert "give each run once" in err
    assert "--labels" not in err  # an option not given is not blamed
    assert not (tmp_path / "t.png").exists()


def test_labels_given_twice_are_refused_by_their_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path / "s1", _rows(1, 1))
    _write_run(tmp_path / "s2", _rows(2, 3))
    argv = ["analyze", "training", "s1", "s2", "--figure", "t.png"]
    assert main([*argv, "--labels", "x,x"]) == 2
    assert "--labels x,x: each run needs a label of its own" in capsys.readouterr().err
    assert main(argv) == 0
    assert "s1: 1 epochs" in capsys.readouterr().out


def test_an_edited_metrics_file_is_refused_not_plotted_shifted(tmp_path, capsys, monkeypatch):
    """A row missing a value plotted the learning rate as accuracy; repeated or reordered
    epochs plotted without a word; an epoch written "2.0" ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    for name, edit, problem in [
        ("fewer", lambda rows: rows[1].rsplit(",", 1)[0], "its number of values differs"),
        ("more", lambda rows: rows[1] + ",7", "its number of values differs"),
        ("twice", lambda rows: "1" + rows[1][1:], "epoch 1 where epoch 2 belongs"),
    ]:
        _write_run(tmp_path / name, _rows(3, 1))
        path = tmp_path / name / "metrics.csv"
        header, *lines = path.read_text().splitlines()
        lines[1] = edit(lines)
        path.write_text("\n".join([header, *lines]) + "\n")
        assert main(["analyze", "training", name, "--figure", "t.png"]) == 2
        assert f"metrics.csv line 3: {problem}" in capsys.readouterr().err, name
    _write_run(tmp_path / "float", _rows(3, 1))
    path = tmp_path / "float" / "metrics.csv"
    path.write_text(path.read_text().replace("\n2,", "\n2.0,"))
    assert main(["analyze", "training", "float", "--figure", "t.png"]) == 0
    assert "float: 3 epochs" in capsys.readouterr().out


def test_a_finished_run_without_metrics_or_with_a_damaged_config_is_named(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path / "done", _rows(2, 1))
    (tmp_path / "done" / "test_results.json").write_text('{"accuracy": 0.5}')
    (tmp_path / "done" / "metrics.csv").unlink()  # "it has not finished an epoch" before
    assert main(["analyze", "training", "done", "--figure", "t.png"]) == 2
    assert "metrics.csv is missing or empty, but the run finished" in capsys.readouterr().err
    _write_run(tmp_path / "cut", _rows(2, 1))
    (tmp_path / "cut" / "config.json").write_text("{")  # accepted before
    assert main(["analyze", "training", "cut", "--figure", "t.png"]) == 2
    assert "config.json cannot be read" in capsys.readouterr().err

"""The S3 gradient argument: spectral radius of λ^(d+1) − aλ^d − b and the measured gradients."""

import csv
import json

import numpy as np
import pytest

from delrec.analysis.gradients import GradientSetup, run_gradient_experiment
from delrec.analysis.spectral import characteristic_roots, spectral_radius, spectral_table
from delrec.cli import main


@pytest.mark.parametrize("a, b", [(0.9, 0.5), (0.3, 0.1), (-0.7, 0.2), (0.2, -0.9), (1.5, 2.0)])
def test_no_delay_gives_the_absolute_value_of_a_plus_b(a, b):
    assert spectral_radius(a, b, 0) == pytest.approx(abs(a + b), abs=1e-15)


@pytest.mark.parametrize("a, b", [(0.9, 0.5), (0.5, 1.0), (0.0, 2.0), (3.0, 10.0)])
def test_every_root_satisfies_the_characteristic_equation(a, b):
    for d in range(0, 61):
        roots = characteristic_roots(a, b, d)
        assert len(roots) == d + 1
        residual = np.abs(roots ** (d + 1) - a * roots**d - b)
        scale = np.abs(roots) ** (d + 1) + abs(a) * np.abs(roots) ** d + abs(b)
        assert residual.max() <= 1e-10 * max(1.0, scale.max())
        if a <= 1 and b <= 2:  # |λ| ≲ 2: the absolute residual is below 1e-10 as well
            assert residual.max() <= 1e-10


def test_radius_decreases_with_delay_toward_one_when_a_plus_b_exceeds_one():
    radii = np.array([row.radius for row in spectral_table(0.5, 1.0, 40)])
    assert radii[0] == pytest.approx(1.5)
    assert np.all(np.diff(radii) < 0) and np.all(radii > 1)
    assert 1 < spectral_radius(0.5, 1.0, 200) < 1.004 < radii[40]


def test_radius_tends_to_a_not_one_when_a_exceeds_one():
    radii = np.array([row.radius for row in spectral_table(1.5, 0.5, 40)])
    assert np.all(np.diff(radii) < 0) and 1.5 < radii[40] < 1.5 + 1e-6


def test_radius_increases_with_delay_toward_one_when_a_plus_b_is_below_one():
    radii = np.array([row.radius for row in spectral_table(0.3, 0.4, 40)])
    assert np.all(np.diff(radii) > 0) and np.all(radii < 1)
    assert radii[40] < 0.996 < spectral_radius(0.3, 0.4, 200) < 1


def test_largest_root_is_the_real_root_of_s17():
    for d in (1, 3, 10):
        roots = characteristic_roots(0.9, 0.5, d)
        top = roots[np.argmax(np.abs(roots))]
        assert abs(top.imag) < 1e-12
        r = top.real
        assert r**d * (r - 0.9) == pytest.approx(0.5, abs=1e-12)


def test_spectral_command_writes_table_csv_json_and_figure(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "analyze",
                "spectral",
                "--a",
                "0.9",
                "--b",
                "0.5",
                "--max-delay",
                "5",
                "--csv",
                str(out / "r.csv"),
                "--json",
                str(out / "r.json"),
                "--figure",
                str(out / "r.png"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "1.400000  explode" in printed
    rows = list(csv.DictReader(open(out / "r.csv", encoding="utf-8")))
    assert [int(r["delay"]) for r in rows] == list(range(6))
    assert float(rows[3]["radius"]) == pytest.approx(spectral_radius(0.9, 0.5, 3))
    records = json.loads((out / "r.json").read_text())
    assert len(records[5]["roots"]) == 6
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_spectral_command_rejects_a_negative_delay(capsys):
    assert (
        main(["analyze", "spectral", "--a", "1", "--b", "1", "--max-delay", "-1", "--no-figure"])
        == 2
    )
    assert "max-delay" in capsys.readouterr().err


def test_gradient_decomposition_and_the_s3_bound_hold_for_every_delay():
    results = run_gradient_experiment(GradientSetup(delays=(0, 3), size=16, steps=40, batch=2))
    for r in results:
        assert r.decomposition_error < 1e-12  # Σ_t G[t] is autograd's ∂L/∂W
        measured, bound = np.array(r.backward_norms), np.array(r.s3_bound)
        assert np.all(measured <= bound * (1 + 1e-9))  # S3's e[k] bounds ‖∂L/∂h[T-1-k]‖
        assert r.radius >= r.growth_measured


def test_exploding_regime_longer_delays_grow_the_gradient_more_slowly():
    setup = GradientSetup(delays=(0, 5, 20), size=64, steps=100, batch=8, gain=6.0, seed=0)
    results = run_gradient_experiment(setup)
    norms = [r.weight_grad_norm for r in results]
    growth = [r.growth_measured for r in results]
    assert norms[0] > 100 * norms[1] > 100 * norms[2]
    assert growth[0] > growth[1] > growth[2] > 1


def test_vanishing_regime_longer_delays_slow_the_vanishing_toward_one():
    setup = GradientSetup(delays=(0, 2, 10), size=32, steps=60, batch=4, gain=1.0, seed=0)
    growth = [r.growth_measured for r in run_gradient_experiment(setup)]
    assert growth[0] < growth[1] < growth[2] < 1


def test_gradients_command_writes_csv_and_figure(tmp_path, capsys):
    assert (
        main(
            [
                "analyze",
                "gradients",
                "--delays",
                "0,2",
                "--size",
                "8",
                "--steps",
                "20",
                "--batch",
                "1",
                "--csv",
                str(tmp_path / "g.csv"),
                "--figure",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert "growth/step" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "g.csv", encoding="utf-8")))
    assert [int(r["delay"]) for r in rows] == [0, 2] and "radius_rms" in rows[0]
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_analysis_outputs_are_checked_before_any_work(tmp_path, capsys):
    base = ["analyze", "spectral", "--a", "0.5", "--b", "1", "--max-delay", "2"]
    for extra, problem in [
        (["--figure", str(tmp_path / "s.xyz")], "give a file name ending in .png, .pdf, .svg"),
        (["--no-figure", "--figure", str(tmp_path / "s.png")], "contradict each other"),
        (["--csv", str(tmp_path / "s.out"), "--json", str(tmp_path / "s.out")], "both name"),
    ]:
        assert main([*base, *extra]) == 2, extra
        assert problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written before the refusal
    assert main([*base, "--figure", str(tmp_path / "s.svg")]) == 0
    assert b"<svg" in (tmp_path / "s.svg").read_bytes()[:400]


def test_gradient_and_spectral_settings_are_checked_and_a_silent_network_has_no_growth(
    tmp_path, capsys
):
    for argv, problem in [
        (["gradients", "--size", "0"], "--size must be in 1…4096"),
        (["gradients", "--tau", "0.5"], "--tau must be >= 1 step"),
        (["gradients", "--gain", "nan"], "--gain must be finite"),
        (["gradients", "--gain", "1e300"], "--gain must be finite and at most 1e+06"),
        (["gradients", "--surrogate-scale", "-1"], "--surrogate-scale must be >= 1e-06"),
        (["gradients", "--surrogate-scale", "1e200"], "--surrogate-scale must be finite and"),
        (["gradients", "--seed", "-1"], "--seed must be in 0…9223372036854775807, got -1"),
        (["gradients", "--seed", str(10**23)], "--seed must be in 0…"),
        (["gradients", "--steps", "100000", "--size", "4096", "--batch", "4096"], "GB of memory"),
        (["spectral", "--a", "nan", "--b", "1"], "--a must be a finite number"),
        (["spectral", "--a", "1", "--b", "-1"], "--b must be a finite number"),
        (["spectral", "--a", "1", "--b", "1", "--max-delay", "100000"], "--max-delay must be in"),
    ]:
        assert main(["analyze", *argv, "--no-figure"]) == 2, argv
        assert problem in capsys.readouterr().err
    silent = ["--size", "8", "--steps", "30", "--batch", "2", "--delays", "0,2"]
    figure = tmp_path / "g.png"
    argv = ["analyze", "gradients", *silent, "--input-mean", "-10", "--figure", str(figure)]
    assert main(argv) == 0 and figure.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr()
    rows = printed.out.splitlines()[1:3]
    assert all(row.split()[2] == "nan" for row in rows), rows  # no gradient: no growth factor
    for delay in (0, 2):  # and why, with the fix
        note = f"note: d = {delay} has no gradient to measure: the layer never spiked"
        assert note in printed.err and "raise --input-mean" in printed.err


def test_a_delay_without_gradient_is_explained_and_written_as_json_null(tmp_path, capsys):
    """At d = 2 every membrane of the last step is outside the triangle's support although the
    layer spikes: no gradient at all, so no growth factor (nan), written as null."""
    out = tmp_path / "g.json"
    argv = ["analyze", "gradients", "--size", "8", "--steps", "30", "--batch", "2"]
    assert main([*argv, "--delays", "0,2", "--json", str(out), "--no-figure"]) == 0
    err = capsys.readouterr().err
    assert "note: d = 0" not in err  # d = 0 has its gradient
    assert "note: d = 2 has no gradient to measure: at the last step" in err
    assert "use --surrogate atan" in err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON, as jq reads it
    zero, two = json.loads(text)["results"]
    assert zero["growth_measured"] > 0 and two["weight_grad_norm"] == 0
    assert two["growth_measured"] is None and two["decomposition_error"] is None


def test_gradient_delays_are_sorted_and_a_repeated_delay_is_refused(capsys):
    assert GradientSetup(delays=(5, 0, 2)).delays == (0, 2, 5)
    argv = ["analyze", "gradients", "--size", "4", "--steps", "8", "--batch", "1", "--no-figure"]
    assert main([*argv, "--delays", "2,0,2"]) == 2
    err = capsys.readouterr().err
    assert "--delays 2,0,2 names the delay 2 more than once; give each delay once" in err
    assert main([*argv, "--delays", "2,0"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [int(row.split()[0]) for row in rows] == [0, 2]


def test_the_spectral_delay_limit_says_how_long_the_largest_table_takes(capsys):
    argv = ["analyze", "spectral", "--a", "1", "--b", "1", "--max-delay", "501", "--no-figure"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--max-delay must be in 0…500, got 501" in err
    assert "D = 500 some 40 times as long, minutes" in err  # measured: D = 200 took 3 to 18 s


def test_an_output_never_replaces_a_file_another_run_keeps(tmp_path, capsys):
    """Not only the run being read: any run's config, metrics, results and checkpoints are
    refused as outputs (an analysis that reads no run at all here)."""
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    kept = {
        other / "config.json": b'{"config": {}}',
        other / "metrics.csv": b"epoch\n1\n",
        other / "checkpoints" / "best.pt": b"weights",
    }
    for path, content in kept.items():
        path.write_bytes(content)
    base = ["analyze", "spectral", "--a", "0.5", "--b", "1", "--max-delay", "2", "--no-figure"]
    for path in kept:
        assert main([*base, "--json", str(path)]) == 2
        assert f"a file of the run {other}" in capsys.readouterr().err
    assert all(path.read_bytes() == content for path, content in kept.items())
    assert main([*base, "--json", str(other / "spectral.json")]) == 0  # beside them: fine

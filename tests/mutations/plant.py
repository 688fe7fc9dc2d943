"""Plant known engine bugs one at a time in a copy of the repository; the tests must catch each.

Run by hand (not part of the test suite, about a minute per mutation plus a C++ build for each
kernel mutation)::

    python tests/mutations/plant.py            # every mutation
    python tests/mutations/plant.py --list     # their names
    python tests/mutations/plant.py cpp-soft-reset-0.9 --all-failures

For each mutation the working tree (tracked files and untracked ones git does not ignore) is
copied to a temporary folder, one snippet of one file is replaced there (it must occur exactly
once), and the mutation's test files run in the copy with ``-x``. The line printed is ``CAUGHT``
with the first test that failed, ``MISSED`` if every test passed, ``BROKEN`` if the mutated
code does not build or the tests could not run, or ``STALE`` if the original snippet is no
longer in the file (the code moved on: update the mutation). The working tree is never
written. C++ kernels are built into a temporary cache that starts from the current builds, so
only mutated kernel sources are compiled. Exit status 0 if every mutation is caught.

Adding one: append a :class:`Mutation` to ``MUTATIONS`` — a name, the file, the original
snippet, the mutated one, and the test files that must catch it (docs/testing.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_TESTS = (
    "tests/test_engine_paths.py",
    "tests/test_engine.py",
    "tests/test_synaptic_kernel.py",
)
# the synaptic engine's own tests first (-x stops at the first failure)
SYNAPTIC_TESTS = ("tests/test_synaptic_kernel.py", "tests/test_engine_paths.py")


@dataclass(frozen=True)
class Mutation:
    """A planted bug: ``original`` replaced by ``mutated`` in ``file`` (relative to the root)."""

    name: str
    what: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...] = ENGINE_TESTS


MUTATIONS = [
    Mutation(
        "cpp-forward-tap",
        "C++ axonal forward reads each tap one step further back (lag + 1)",
        "src/delrec/engine/csrc/axonal.cpp",
        "const int64_t slot = forward ? std::max<int64_t>(t - lag + 1, 0)",
        "const int64_t slot = forward ? std::max<int64_t>(t - lag, 0)",
    ),
    Mutation(
        "torch-forward-tap",
        "PyTorch-op axonal loop reads each tap one step further back (lag + 1)",
        "src/delrec/engine/axonal.py",
        "slots = (t - lags + 1).clamp(min=0) if sign < 0",
        "slots = (t - lags).clamp(min=0) if sign < 0",
    ),
    Mutation(
        "delay-gradient-sign",
        "axonal delay gradient with its sign flipped",
        "src/delrec/engine/axonal.py",
        "grad_delay = (by_slope * plan.inv_w2).to(delay.dtype)",
        "grad_delay = (-by_slope * plan.inv_w2).to(delay.dtype)",
    ),
    Mutation(
        "cpp-soft-reset-0.9",
        "C++ soft reset (both kernels) subtracts 0.9·threshold",
        "src/delrec/engine/csrc/lif.h",
        "return soft_reset ? h - threshold * (spike ? scalar_t(1) : scalar_t(0))",
        "return soft_reset ? h - scalar_t(0.9) * threshold * (spike ? scalar_t(1) : scalar_t(0))",
    ),
    Mutation(
        "float32-lane-mixup",
        "float32-only lane mix-up in the synaptic gradient sums (AVX-512 register tree)",
        "src/delrec/engine/csrc/synaptic.cpp",
        "for (int q = 0; q < 16; ++q) in[4 * (q % 4) + q / 4] = v[q];",
        "for (int q = 0; q < 16; ++q) in[q] = v[q];",
        SYNAPTIC_TESTS,
    ),
    Mutation(
        "block-local-trace-index",
        "C++ axonal trace copy indexes neurons within their block of 16",
        "src/delrec/engine/csrc/axonal.cpp",
        "out[b * n + j] = static_cast<scalar_t>(y[j * batch + b]);",
        "out[b * n + j] = static_cast<scalar_t>(y[(j - j0) * batch + b]);",
    ),
    Mutation(
        "axonal-row-sum-lanes",
        "C++ axonal backward: delay and spread sums pair each adjoint with its neighbour's count",
        "src/delrec/engine/csrc/axonal.cpp",
        "product[i] = static_cast<double>(g[b + i]) * static_cast<double>(x[b + i]);",
        "product[i] = static_cast<double>(g[b + i]) * static_cast<double>(x[b + (i ^ 1)]);",
    ),
    Mutation(
        "axonal-input-dropout-step",
        "C++ axonal forward drops its input with the mask of the next step",
        "src/delrec/engine/csrc/axonal.cpp",
        "dropout.input.apply_to_row(dropped.data(), row_drive, words, n, b, t);",
        "dropout.input.apply_to_row(dropped.data(), row_drive, words, n, b, t + 1);",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "axonal-backward-dropout-step",
        "C++ axonal backward multiplies the current's gradient by the mask of the next step",
        "src/delrec/engine/csrc/axonal.cpp",
        "dropout.input.apply_to_row(grad_c_p + now + row, gh_p + row, words, n, b, t);",
        "dropout.input.apply_to_row(grad_c_p + now + row, gh_p + row, words, n, b, t + 1);",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "axonal-output-dropout-step",
        "C++ axonal backward multiplies the spikes' gradient by the output mask of the next step",
        "src/delrec/engine/csrc/axonal.cpp",
        "dropout.output.apply_to_row(kept + row, grad_s + row, words, n, b, t);",
        "dropout.output.apply_to_row(kept + row, grad_s + row, words, n, b, t + 1);",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "axonal-recurrent-gradient-unmasked",
        "C++ axonal backward: the recurrent GEMM's and weight gradient's input without the mask",
        "src/delrec/engine/csrc/axonal.cpp",
        "masked[i] = g * mask[i];",
        "masked[i] = g;",
    ),
    Mutation(
        "axonal-weight-gradient-flush",
        "C++ axonal backward adds its buffered steps to the weight gradient one step late",
        "src/delrec/engine/csrc/axonal.cpp",
        "if (need_weight && t == first) {",
        "if (need_weight && t == first + 1) {",
    ),
    Mutation(
        "triton-axonal-forward-tap",
        "Triton axonal forward reads its first tap one step further back (interpreter on CPU)",
        "src/delrec/engine/triton/axonal.py",
        "src0 = t - tl.load(lag + 0, mask=col_ok, other=1)",
        "src0 = t - 1 - tl.load(lag + 0, mask=col_ok, other=1)",
    ),
    Mutation(
        "feedforward-slope-sign",
        "C++ feedforward delays: the position slope of each tap with its sign flipped",
        "src/delrec/engine/csrc/feedforward.cpp",
        "scalar_t((d > p) - (d < p))",
        "scalar_t((d < p) - (d > p))",
        ("tests/test_feedforward_engine.py",),
    ),
    Mutation(
        "fused-lif-mask-mixup",
        "C++ fused feedforward LIF backward multiplies by the output dropout mask, not the input's",
        "src/delrec/engine/csrc/fused.cpp",
        "gc[i] = (g * next) * mi[i];",
        "gc[i] = (g * next) * mo[i];",
        ("tests/test_fused.py",),
    ),
    Mutation(
        "synaptic-far-read",
        "C++ synaptic shifted reads: far synapses read their class ring one diagonal too new",
        "src/delrec/engine/csrc/synaptic.cpp",
        "int64_t row = head + q0 - s.level;  // diagonal t0 + q0 - m",
        "int64_t row = head + q0 + 1 - s.level;  // diagonal t0 + q0 - m",
        SYNAPTIC_TESTS,
    ),
    Mutation(
        "synaptic-ring-wrap",
        "C++ synaptic shifted reads: a level's ring row one row off where the ring wraps",
        "src/delrec/engine/csrc/synaptic.cpp",
        "return row < 0 ? row + depth : row;",
        "return row < 0 ? row + depth - 1 : row;",
        SYNAPTIC_TESTS,
    ),
    Mutation(
        "distributed-gradient-scale",
        "data-parallel loss weighted by the rank's share only: gradients 1/K of one process's",
        "src/delrec/training/loop.py",
        "total = total * (self.dist.world_size * share)",
        "total = total * share",
        ("tests/test_distributed.py",),
    ),
]


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) into ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def plant(copy: Path, mutation: Mutation) -> str | None:
    """Plant ``mutation`` in ``copy``; the reason it can't be planted, or None."""
    path = copy / mutation.file
    text = path.read_text() if path.is_file() else ""
    count = text.count(mutation.original)
    if count != 1:
        return (
            f"the original snippet occurs {count} times in {mutation.file} (expected once): "
            "update the mutation to the current code"
        )
    path.write_text(text.replace(mutation.original, mutation.mutated))
    return None


def kernel_cache(folder: Path) -> Path:
    """A kernel cache whose builds are links to the current ones (mutated sources get their own
    folders, by source hash)."""
    current = Path(os.environ.get("DELREC_CACHE", Path.home() / ".cache" / "delrec")) / "kernels"
    (folder / "kernels").mkdir(parents=True)
    if current.is_dir():
        for build in current.iterdir():
            (folder / "kernels" / build.name).symlink_to(build, target_is_directory=True)
    return folder


def run(
    mutation: Mutation, cache: Path, all_failures: bool, deselect: tuple[str, ...] = ()
) -> tuple[str, str, float]:
    """(verdict, detail, seconds) of one mutation."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"delrec-mutation-{mutation.name}-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        stale = plant(copy, mutation)
        if stale:
            return "STALE", stale, time.monotonic() - start
        env = {
            **os.environ,
            "PYTHONPATH": str(copy / "src"),
            "DELREC_CACHE": str(cache),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.pop("DELREC_NATIVE", None)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf"]
        command += [] if all_failures else ["-x"]
        command += [f"--deselect={test}" for test in deselect]
        result = subprocess.run(
            command + list(mutation.tests), cwd=copy, env=env, capture_output=True, text=True
        )
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.M)
    if "could not be built" in output:
        return "BROKEN", "the mutated C++ kernels do not build", seconds
    if result.returncode == 0:
        return "MISSED", "every test passed", seconds
    if result.returncode == 1 and failed:
        detail = failed[0] if len(failed) == 1 else f"{len(failed)} tests, first {failed[0]}"
        return "CAUGHT", f"by {detail}", seconds
    return "BROKEN", f"pytest exit status {result.returncode}: {output.strip()[-500:]}", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    parser.add_argument(
        "--all-failures", action="store_true", help="run every test (not -x) and count failures"
    )
    parser.add_argument(
        "--deselect",
        action="append",
        default=[],
        metavar="TEST",
        help="leave out a test (pytest node id) that fails without any mutation",
    )
    parser.add_argument(
        "--table",
        type=Path,
        metavar="FILE",
        help="also write the results as a markdown page (docs/testing/mutations.md)",
    )
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.what} ({m.file})")
        return 0
    unknown = set(args.names) - set(by_name)
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS
    results = []
    command = " ".join(["python tests/mutations/plant.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="delrec-mutation-cache-") as cache:
        cache = kernel_cache(Path(cache))
        for mutation in chosen:
            verdict, detail, seconds = run(mutation, cache, args.all_failures, tuple(args.deselect))
            results.append((mutation, verdict, detail, seconds))
            print(f"{verdict:7s} {mutation.name:26s} {detail}  [{seconds:.0f} s]", flush=True)
            if args.table:  # after each mutation: a long run that stops keeps what it measured
                write_table(args.table, results[-1:], command)
    caught = sum(verdict == "CAUGHT" for _, verdict, _, _ in results)
    print(f"{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


def commands_still_behind_rows(commands: list[str]) -> list[str]:
    """The commands (oldest first) that still made some row: a command whose every mutation
    was run again by a later command is dropped (no names on a command: every mutation)."""
    names = {m.name for m in MUTATIONS}

    def ran(command: str) -> set[str]:
        return {word for word in command.split() if word in names} or names

    kept, later = [], set()
    for command in reversed(dict.fromkeys(commands)):
        if ran(command) - later:
            kept.append(command)
        later |= ran(command)
    return kept[::-1]


def write_table(path: Path, results, command: str) -> None:
    """The results as a markdown page, one row per mutation in the order of ``MUTATIONS``. Rows
    of mutations not run this time are kept from the page as it was (so mutations can be run a
    few at a time, or rerun alone); each row says the commit and date it was measured at."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    dirty = "+" if git("status", "--porcelain", "--untracked-files=no") else ""
    commit = git("rev-parse", "--short", "HEAD") + dirty
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    old = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    rows = {m.group(1): line for line in old if (m := re.match(r"\| `([\w.-]+)` \|", line))}
    commands = [line for line in old if line.startswith("    python ")]
    for mutation, verdict, detail, took in results:
        detail = detail.removeprefix("by ").replace("|", "\\|")
        rows[mutation.name] = (
            f"| `{mutation.name}` | {mutation.what} | `{mutation.file}` | {verdict} | "
            f"{detail} | {took:.0f} s | `{commit}`, {date} |"
        )
    order = [m.name for m in MUTATIONS if m.name in rows]
    caught = sum(rows[name].split(" | ")[3] == "CAUGHT" for name in order)
    lines = [
        "# Mutation check: results",
        "",
        "Generated by `tests/mutations/plant.py --table` (see docs/testing.md#the-mutation-check);",
        "do not edit by hand, rerun it to refresh. The commands that made the rows below "
        f"({os.cpu_count()} cores; `+`: the commit with uncommitted changes):",
        "",
        *commands_still_behind_rows([*commands, f"    {command}"]),
        "",
        f"**{caught} of {len(order)} mutations caught.**",
        "",
        "| mutation | planted bug | file | verdict | first failing test | time | measured at |",
        "|---|---|---|---|---|---|---|",
        *(rows[name] for name in order),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())

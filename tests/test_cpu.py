"""delrec.cpu: a training loop's freed CPU tensors are reused, not faulted in again, and
subnormal floats are flushed to zero on every thread of PyTorch's pool."""

import contextlib
import ctypes
import os
import resource
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from delrec import cli, cpu
from delrec.cpu import keep_freed_memory
from delrec.layers import DelRec

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not GLIBC, reason="needs glibc's malloc (Linux)")
def test_training_steps_reuse_freed_memory():
    assert keep_freed_memory()
    layer = DelRec(128, delay_init="uniform:0:40", recurrent_dropout=0.2)
    current = torch.randn(150, 64, 128).requires_grad_()

    def faults_of_a_step() -> int:  # minor page faults of one forward and backward
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        layer(current).sum().backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [faults_of_a_step() for _ in range(12)]  # glibc's defaults: ≈ 2,000 each
    assert min(faults[-4:]) < 50, faults  # the heap has stopped growing


@pytest.mark.skipif(not GLIBC, reason="needs glibc's malloc (Linux)")
def test_tensors_beyond_glibcs_mapping_threshold_reuse_freed_memory():
    """Blocks over 32 MiB (a PS-MNIST step's (T, B, N) tensors are 170 MB), which glibc would
    map afresh at every allocation whatever its mapping threshold, come from the heap too, and
    once the heap has stopped growing no allocation faults. It grows a few times first: PyTorch
    asks for 64-byte-aligned blocks, which glibc serves from a free chunk only if it holds the
    block plus its alignment, so a freed 64 MB block serves the next one only once it has
    merged with a free neighbour. Measured in a fresh process (one that earlier tests left a
    fragmented heap could grow for longer), 40 times: the last allocation that faulted was the
    3rd to the 6th of 16."""
    code = textwrap.dedent(
        """
        import resource, torch
        from delrec.cpu import keep_freed_memory

        def faults_of_an_allocation():  # 64 MB, written once, freed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(16 * 2**20).sum()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        kept = keep_freed_memory()
        print(kept, *[faults_of_an_allocation() for _ in range(16)])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    kept, *faults = done.stdout.split()
    faults = [int(f) for f in faults]  # glibc's defaults: ≈ 16,000 each
    assert kept == "True" and max(faults[-6:]) < 100, faults  # the heap has stopped growing


class OtherLibc:
    """A C library other than glibc (musl, say): ``mallopt`` but no ``gnu_get_libc_version``."""

    def __init__(self):
        self.calls = []

    def mallopt(self, *args):
        self.calls.append(args)
        return 1


def test_other_c_libraries_are_left_alone(monkeypatch):
    libc = OtherLibc()
    monkeypatch.setattr(cpu, "ctypes", types.SimpleNamespace(CDLL=lambda name: libc))
    monkeypatch.setattr(cpu, "sys", types.SimpleNamespace(platform="linux"))
    assert keep_freed_memory() is False and libc.calls == []
    opened = types.SimpleNamespace(CDLL=lambda name: pytest.fail("a C library was opened"))
    monkeypatch.setattr(cpu, "ctypes", opened)
    monkeypatch.setattr(cpu, "sys", types.SimpleNamespace(platform="darwin"))
    assert keep_freed_memory() is False


# A fresh process (the flag is per thread and copied to each thread a thread starts): whether the
# product of the smallest subnormal by 1, split over the pool's threads, leaves non-zero bits.
PROBE = """
import warnings, torch
from delrec import cpu
torch.set_num_threads(2)
if {pool_first}:
    (torch.ones(1 << 22) * 2).sum()  # starts the pool's workers before the flag is set
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    configured = cpu.configure()["flush_denormals"]
def kept(threads):
    torch.set_num_threads(threads)
    smallest = torch.ones(threads * 65536, dtype=torch.int32).view(torch.float32)
    return int((smallest * 1.0).view(torch.int32).count_nonzero())
print(configured, kept(2), kept(3), len(caught), caught[0].message if caught else "")
"""


def _probe(pool_first: bool) -> list[str]:
    code = textwrap.dedent(PROBE.format(pool_first=pool_first))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.split(maxsplit=4)


# True where PyTorch can set the flag (x86 CPUs); tests/conftest.py has set it already
X86 = torch.set_flush_denormal(True)


@pytest.mark.skipif(not X86, reason="PyTorch flushes subnormals on x86 CPUs only")
def test_subnormals_are_flushed_on_every_worker_thread():
    configured, two, three, warned = _probe(pool_first=False)[:4]
    assert (configured, two, three, warned) == ("True", "0", "0", "0")


@pytest.mark.skipif(not X86, reason="PyTorch flushes subnormals on x86 CPUs only")
def test_a_pool_started_too_early_is_reported():
    configured, two, _, warned, message = _probe(pool_first=True)
    assert configured == "False" and int(two) > 0 and warned == "1"
    assert "before the first multi-threaded operation" in message


def _flushes_on_this_thread() -> bool:
    """Whether this thread flushes: the smallest subnormal times 1, checked by its bits."""
    smallest = torch.ones(8, dtype=torch.int32).view(torch.float32)
    return not (smallest * 1.0).view(torch.int32).any()


@contextlib.contextmanager
def _flushing_turned_off():
    """This thread keeps subnormals for the block (tests/conftest.py had flushing on), and
    flushes again after it."""
    torch.set_flush_denormal(False)
    try:
        assert not _flushes_on_this_thread()
        yield
    finally:
        torch.set_flush_denormal(True)


@pytest.mark.skipif(not X86, reason="PyTorch flushes subnormals on x86 CPUs only")
def test_the_command_line_flushes_subnormals(capsys):
    with _flushing_turned_off():
        with pytest.raises(SystemExit):
            cli.main(["train", "--help"])
        assert _flushes_on_this_thread()


@pytest.mark.skipif(not X86, reason="PyTorch flushes subnormals on x86 CPUs only")
def test_a_trainer_applies_the_process_settings(tmp_path):
    """A script that trains through delrec.training gets what the command line sets."""
    from delrec.config import resolve
    from delrec.training.loop import Trainer

    config = resolve("digits-8x8", overrides=["epochs=1", "network.hidden_sizes=[8]"])
    with _flushing_turned_off():
        Trainer(config, tmp_path / "run", progress=False, log=lambda message: None)
        assert _flushes_on_this_thread()


@pytest.mark.skipif(not X86, reason="PyTorch flushes subnormals on x86 CPUs only")
def test_a_training_step_that_keeps_subnormals_warns_once(monkeypatch):
    """A loop of one's own without delrec.cpu.configure(): the first training step of a layer
    or a network says so, once; inference and a flushing thread say nothing."""
    from delrec.models import build_network, preset_network

    layer, x = DelRec(4), torch.rand(5, 2, 4)
    network = build_network(preset_network("digits-8x8", "snn"), seed=0)  # no DelRec layer
    frames = torch.rand(3, 2, network.config.input_size)
    for step in (lambda: layer(x), lambda: network(frames)):
        monkeypatch.setattr(cpu, "_subnormals_checked", False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step()  # this thread flushes (tests/conftest.py)
        monkeypatch.setattr(cpu, "_subnormals_checked", False)
        with _flushing_turned_off():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with torch.no_grad():
                    step()  # no training step: not checked yet
            with pytest.warns(cpu.SubnormalWarning, match=r"delrec\.cpu\.configure\(\)"):
                step()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                step()  # once per process


@pytest.mark.parametrize(
    ("limit", "expected"),
    [("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), ("garbage\n", None)],
)
def test_usable_cpus_follow_a_cgroup_quota(tmp_path, monkeypatch, limit, expected):
    """A container's CPU limit (cgroup v2 ``cpu.max``: quota and period, in µs) caps the CPUs
    the process may use at ``⌈quota / period⌉``; without a quota, the affinity mask counts."""
    (tmp_path / "cpu.max").write_text(limit)
    monkeypatch.setattr(cpu, "CGROUP_CPU_LIMIT", str(tmp_path / "cpu.max"))
    pinned = len(os.sched_getaffinity(0))
    assert cpu.usable_cpus() == (pinned if expected is None else min(pinned, expected))


# A fresh process whose cgroup allows one CPU's time: the threads PyTorch starts with, and after
# configure()
THREADS = """
import sys, torch
from delrec import cpu
cpu.CGROUP_CPU_LIMIT = sys.argv[1]
before = torch.get_num_threads()
print(before, cpu.configure()["match_threads_to_cpus"], torch.get_num_threads())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to lower from")
@pytest.mark.parametrize("chosen", [None, "2"])
def test_threads_are_lowered_to_the_cpu_quota_unless_chosen(tmp_path, chosen):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    env = {k: v for k, v in os.environ.items() if k not in cpu.THREAD_VARIABLES}
    if chosen:
        env["OMP_NUM_THREADS"] = chosen
    done = subprocess.run(
        [sys.executable, "-c", THREADS, str(tmp_path / "cpu.max")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    before, lowered, after = done.stdout.split()
    assert int(before) >= 2
    assert (lowered, after) == (("False", before) if chosen else ("True", "1"))

"""Building the C++ kernels into the shared cache (delrec.engine.native): a build that a killed
process left behind stops nothing, and processes that build at the same time each get a whole
library. A one-function pybind11 source stands in for the kernels (a few seconds to compile)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from delrec.engine import native

pytestmark = pytest.mark.skipif(
    not native.enabled(), reason="DELREC_NATIVE=0: no C++ kernels are built here"
)

SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

# Runs in a fresh process: build the stand-in kernel from the sources folder in argv[1]
BUILD = """
import sys
from pathlib import Path
from delrec.engine import native
native.SOURCES = Path(sys.argv[1])
print(native.build("tiny").answer())
"""


@pytest.fixture
def sources(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "csrc"
    folder.mkdir()
    (folder / "tiny.cpp").write_text(SOURCE)
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCES", folder)
    return folder


def start_build(sources: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(sources)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def finish(process: subprocess.Popen) -> str:
    """The build's stderr, after checking that it printed the stand-in's answer (within 5
    minutes: a build that waits on a lock forever fails here instead of hanging the suite)."""
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the build did not finish in 5 minutes (waiting on a lock?)")
    assert process.returncode == 0, err
    assert out.strip() == "42"
    return err


def test_a_build_left_by_a_killed_process_stops_nothing(sources):
    folder = native._build_directory("tiny")
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what torch's build lock leaves when its process is killed
    kernels = folder.parent
    stale = kernels / f".{folder.name}.building-killed"
    stale.mkdir()
    (stale / "half.o").write_bytes(b"\0" * 100)
    hours_ago = time.time() - 2 * native.STALE_BUILD_SECONDS
    os.utime(stale, (hours_ago, hours_ago))
    running = kernels / f".{folder.name}.building-running"  # another process's build, now
    running.mkdir()

    assert "compiling the C++ kernels 'tiny'" in finish(start_build(sources))

    assert (folder / "delrec_tiny.so").is_file()
    assert not stale.exists()
    assert running.is_dir()
    assert sorted(p.name for p in kernels.iterdir()) == sorted([folder.name, running.name])
    # the next process imports the cached library without compiling
    assert "compiling" not in finish(start_build(sources))


def test_processes_building_at_once_each_get_a_whole_library(sources):
    builds = [start_build(sources) for _ in range(2)]
    for build in builds:
        assert "compiling the C++ kernels 'tiny'" in finish(build)
    kernels = native._build_directory("tiny").parent
    assert [p.name for p in kernels.iterdir()] == [native._build_directory("tiny").name]
    assert "compiling" not in finish(start_build(sources))


@pytest.fixture
def uncached():
    """The kernel loaders' per-process caches cleared before and after the test (the other
    tests load the kernels from the real cache again)."""
    native.build.cache_clear()
    native._built_or_warned.cache_clear()
    yield
    native.build.cache_clear()
    native._built_or_warned.cache_clear()


def test_a_failed_build_leaves_no_library_and_no_workspace(sources, uncached):
    (sources / "tiny.cpp").write_text(SOURCE + "\nthis is not C++;\n")
    with pytest.raises(Exception, match="Error building extension 'delrec_tiny'"):
        native.build("tiny")
    folder = native._build_directory("tiny")
    assert list(folder.iterdir()) == []
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    native.build.cache_clear()
    # the warning quotes the compiler's error, not its command line
    with pytest.warns(RuntimeWarning, match=r"extension 'delrec_tiny\w*': .*error:"):
        assert native.load("tiny") is None


def test_a_damaged_library_in_the_cache_is_named_in_one_warning(sources, uncached):
    folder = native._build_directory("tiny")
    folder.mkdir(parents=True)
    (folder / "delrec_tiny.so").write_bytes(b"\x7fELF cut short")
    with pytest.warns(RuntimeWarning, match=f"could not be built or loaded.*delete {folder}"):
        assert native.load("tiny") is None


def test_each_python_gets_its_own_build(monkeypatch):
    """Two environments with the same torch but different Pythons share ~/.cache/delrec: a
    library built for one fails to load, or crashes, in the other, so each gets its folder."""
    here = native._build_directory("ring")
    real = native.sysconfig.get_config_var

    def other_python(name):
        return ".cpython-399-x86_64-linux-gnu.so" if name == "EXT_SUFFIX" else real(name)

    monkeypatch.setattr(native.sysconfig, "get_config_var", other_python)
    assert native._build_directory("ring") != here


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) here")
def test_every_kernel_is_valid_cxx17_with_and_without_avx512(tmp_path):
    """torch's CPU wheels compile extensions as C++20 and its CUDA wheels (the default on Linux)
    as C++17, where a template called by its bare name is not found in another namespace by
    argument-dependent lookup: axonal and synaptic failed to build there, and every layer ran
    the slower PyTorch-op path after one warning. Each source is checked as C++17 (syntax and
    templates, no code generated) with its AVX-512 code and with the portable vectors of an
    AVX2 laptop, whatever this CPU has (x86; elsewhere as for this CPU). torch's headers,
    three quarters of each check, are parsed once per variant into a precompiled header."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = ["c++", "-std=c++17", "-DTORCH_EXTENSION_NAME=check"]
    command += ["-DTORCH_API_INCLUDE_EXTENSION_H", *native.CFLAGS]
    command += [f"-isystem{folder}" for folder in includes]
    sources = sorted(native.SOURCES.glob("*.cpp"))
    assert len(sources) >= 5
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    variants = {"avx512": ["-mavx512f"], "portable": list(native.PORTABLE)} if x86 else {"": []}
    headers = {name: tmp_path / (name or "native") / "torch_headers.h" for name in variants}
    for header in headers.values():
        header.parent.mkdir()
        header.write_text("#include <torch/extension.h>\n", encoding="utf-8")
    try:
        precompile = {
            f"headers {name}": [*command, *flags, "-x", "c++-header", str(headers[name])]
            for name, flags in variants.items()
        }
        assert _run_all(precompile) == {}
        checks = {
            f"{source.name} {name}".strip(): [
                *command,
                *flags,
                "-fsyntax-only",
                "-include",
                str(headers[name]),
                str(source),
            ]
            for source in sources
            for name, flags in variants.items()
        }
        assert _run_all(checks) == {}
    finally:  # a precompiled torch is about 750 MB
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_all(commands: dict[str, list[str]]) -> dict[str, list[str]]:
    """Run ``commands`` (name → argv), as many at once as there are cores; the first error
    lines of each that failed, by name."""
    pending, running, errors = list(commands.items()), [], {}
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            name, argv = pending.pop()
            running.append((name, subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)))
        name, check = running.pop(0)
        _, err = check.communicate(timeout=600)
        if check.returncode != 0:
            errors[name] = [line for line in err.splitlines() if "error" in line][:3] or [err]
    return errors

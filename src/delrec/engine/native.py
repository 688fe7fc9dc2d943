"""The engine's C++ kernels (``engine/csrc/*.cpp``, sharing ``csrc/*.h``), compiled on first use.

The per-step elementwise work of the C++ engine paths (tap reads, the float64 trace recursion,
the neuron update and its adjoint) is fused into C++ loops that run the whole time loop, calling
ATen's GEMM each step. They are built with ``torch.utils.cpp_extension.load`` the first time
they are needed (about a minute; needs a C++ compiler and ``ninja``, a dependency of the
package) and cached per torch version, Python version and CPU in ``$DELREC_CACHE`` (default
``~/.cache/delrec``). When they cannot be built, :func:`load` returns ``None`` after one
warning that says why, and the engine selector picks a PyTorch-op path (same results, slower).
``DELREC_NATIVE=0`` turns them off.

They are compiled for the CPU they run on (``-march=native``): the kernels with AVX-512
intrinsics keep a portable version (GCC/Clang vectors or plain loops) that the compiler takes
where the CPU lacks them (``__AVX512F__`` undefined: AVX2 laptops, ARM), so one source builds
everywhere; the feedforward kernels name theirs in their ``simd`` attribute. :func:`build` with
``flags=PORTABLE`` compiles the portable version on an x86 CPU that has AVX-512, so that tests
run both versions there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from delrec import user_warnings

SOURCES = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # OpenMP: at::parallel_for
# Extra flags that build a kernel's portable vectors on x86 whatever the CPU has (a variant)
PORTABLE = ("-mno-avx512f",)


def enabled() -> bool:
    """False when ``DELREC_NATIVE=0`` asks for the PyTorch-op engine only."""
    return os.environ.get("DELREC_NATIVE", "1") != "0"


def _build_directory(name: str, flags: tuple[str, ...] = ()) -> Path:
    """The build folder (not created here): one per kernel source (with the shared headers),
    compiler flags (``flags`` added to :data:`CFLAGS`), torch version, Python ABI (a library
    built for another Python fails to load, or crashes, in this one) and CPU model
    (``-march=native``)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu += next(
            line
            for line in Path("/proc/cpuinfo")
            .read_text(encoding="utf-8", errors="replace")
            .splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        pass
    headers = sorted(SOURCES.glob("*.h"))
    source = b"".join(path.read_bytes() for path in [SOURCES / f"{name}.cpp", *headers])
    python = sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag
    stamp = " ".join([torch.__version__, python, *CFLAGS, *flags, cpu]).encode()
    key = hashlib.sha256(source + stamp).hexdigest()[:16]
    root = Path(os.environ.get("DELREC_CACHE", Path.home() / ".cache" / "delrec"))
    return root / "kernels" / f"{name}-{key}"


def _ninja_on_path() -> None:
    """Put the ``ninja`` of the Python package on ``PATH`` when no other is there (a venv's
    ``bin`` is not on ``PATH`` unless the venv is activated)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # cpp_extension then says that ninja is missing
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def build(name: str, flags: tuple[str, ...] = ()) -> ModuleType:
    """Compile ``csrc/<name>.cpp``, or import the build cached for this source, torch, Python
    and CPU; raises on failure. ``flags``: extra compiler flags, for a variant (its own module
    name and build folder, e.g. :data:`PORTABLE`)."""
    variant = "_" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8] if flags else ""
    module, folder = f"delrec_{name}{variant}", _build_directory(name, flags)
    library = folder / f"{module}.so"
    if library.is_file():
        spec = importlib.util.spec_from_file_location(module, library)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    return _compile(name, module, flags, library)


# A private build folder older than this is left over from a process that was killed mid-build
STALE_BUILD_SECONDS = 3600


def _compile(name: str, module: str, flags: tuple[str, ...], library: Path) -> ModuleType:
    """Build ``module`` in a folder of this process's own, then move the library into place
    with one atomic rename: the cache never holds a partly written library or a lock file, so
    processes that build at the same time each get a whole one (the last rename wins, with the
    same bytes), and a process killed mid-build leaves nothing that stops the next."""
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{library.parent.name}.building-"
    for old in library.parent.parent.glob(prefix + "*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another process removed it first
            pass
    _ninja_on_path()
    print(
        f"delrec: compiling the C++ kernels '{name}' (first use on this machine, about "
        f"a minute) into {library.parent}",
        file=sys.stderr,
        flush=True,
    )
    workspace = Path(tempfile.mkdtemp(prefix=prefix, dir=library.parent.parent))
    try:
        loaded = cpp_extension.load(
            name=module,
            sources=[str(SOURCES / f"{name}.cpp")],
            build_directory=str(workspace),
            extra_cflags=[*CFLAGS, *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        os.replace(workspace / f"{module}.so", library)  # the loaded library stays mapped
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return loaded


def unavailable(name: str) -> str:
    """Why the C++ kernels ``name`` can't run, and what to do."""
    why = "DELREC_NATIVE=0" if not enabled() else "they could not be built: see the warning"
    return (
        f"delrec: the C++ kernels '{name}' are not available here ({why}); choose another "
        "engine path (delrec.engine.select picks one that runs here)"
    )


def load(name: str) -> ModuleType | None:
    """The compiled kernel module ``name``, or ``None`` if ``DELREC_NATIVE=0`` or (with one
    warning) if it can't be built."""
    return _built_or_warned(name) if enabled() else None


@functools.cache
def _built_or_warned(name: str) -> ModuleType | None:
    try:
        return build(name)
    except Exception as error:  # compiler missing, ninja missing, build error: say which
        user_warnings.warn(
            f"delrec: the C++ kernels '{name}' could not be built or loaded "
            f"({_reason(error)}); the engine runs its slower PyTorch-op path. Install "
            f"a C++ compiler and ninja, or delete {_build_directory(name)} to rebuild "
            "a damaged build, or set DELREC_NATIVE=0 to silence this.",
            RuntimeWarning,
        )
        return None


def _reason(error: Exception) -> str:
    """The line of a failed build or load that says why: the compiler's first error (a build
    error's message starts with the compiler's command line, hundreds of characters of flags),
    else the message's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return repr(error)
    compiler_error = next((line for line in lines if "error:" in line), None)
    if compiler_error is None:
        return lines[0]
    return f"{lines[0].split(':')[0]}: {compiler_error}"

"""Set up the test process as the `delrec` command line sets up its own (delrec.cpu.configure:
subnormal floats flushed to zero, freed memory kept), then build the engine's C++ kernels once,
before any test runs (about a minute on a fresh machine), so that tests and the processes they
start find them in the cache. A failed build leaves a warning here and fails
``test_engine.py::test_the_cpp_time_loops_build_and_run_by_default``."""

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be on before any
# test imports a kernel module: triton 3.7 keeps a helper compiled while the interpreter was
# off as a compiled function, and the interpreter then refuses to call it from a kernel
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from delrec import cpu  # noqa: E402
from delrec.engine import native  # noqa: E402


def pytest_sessionstart(session):
    cpu.configure()  # before the first multi-threaded operation (see delrec.cpu)
    for kernels in ("axonal", "synaptic", "feedforward", "fused"):
        native.load(kernels)


def pytest_report_header(config):
    kernels = native.load("feedforward")
    vectors = "not built" if kernels is None else kernels.simd
    return (
        f"delrec C++ feedforward kernels on this CPU: {vectors} "
        "(test_feedforward_engine.py also runs their portable build)"
    )

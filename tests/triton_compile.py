"""Compile every Triton kernel of the engine for a Hopper GPU (sm_90a) without one.

    PYTHONPATH=src python tests/triton_compile.py

Triton compiles ahead of time for a named target with its own ``ptxas``: this catches what the
interpreter does not check (what the compiler accepts, registers, spills) on a machine without
a GPU. Prints one line per kernel variant: compile time, shared memory, registers per thread
and bytes spilled (from ``ptxas -v``); exits non-zero if one does not compile.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, don't interpret (before the kernels load)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from delrec.engine.triton import axonal, fused, ring, synaptic  # noqa: E402
from delrec.engine.triton.lif import recurrent_tiles  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def variants():
    """(kernel, argument types, constexprs, warps) for the variants the engine launches: the
    recurrent kernels with the tiles :func:`recurrent_tiles` gives N = 256 and N = 1024 in
    float32 and N = 256 in float64; the fused network kernels (with both dropout masks, the
    backward variants) in float32 and float64."""
    for n, dtype, f in (
        (256, tl.float32, "*fp32"),
        (1024, tl.float32, "*fp32"),
        (256, tl.float64, "*fp64"),
    ):
        torch_dtype = torch.float32 if dtype == tl.float32 else torch.float64
        tiles = recurrent_tiles(n, torch_dtype)
        warps = tiles.warps
        rec = dict(
            BLOCK_B=tiles.batch,
            BLOCK_N=tiles.neurons,
            BLOCK_K=tiles.inner,
            PRECISION=tiles.precision,
        )
        wide = recurrent_tiles(n, torch_dtype, wide=True)  # the axonal kernels' tiles
        axonal_rec = dict(
            BLOCK_B=wide.batch, BLOCK_N=wide.neurons, BLOCK_K=wide.inner, PRECISION=wide.precision
        )
        yield (
            axonal._forward_kernel,
            dict(
                drive_ptr=f,
                weight_ptr=f,
                mask_ptr=f,
                lags_ptr="*i32",
                coef_ptr="*fp64",
                const_ptr="*fp64",
                state_ptr="*fp64",
                history_ptr="*u8",
                spikes_ptr=f,
                membrane_ptr=f,
                trace_ptr=f,
                slope_ptr="*i8",
                support_ptr="*i8",
                steps="i32",
                batch="i32",
                n="i32",
            ),
            dict(
                DTYPE=dtype,
                SOFT_RESET=False,
                HAS_MASK=True,
                NEED_SLOPE=True,
                NEED_SUPPORT=True,
                BLOCK_R=wide.recursion,
                **axonal_rec,
            ),
            wide.warps,
        )
        yield (
            axonal._backward_kernel,
            dict(
                grad_spikes_ptr=f,
                membrane_ptr=f,
                psi_ptr=f,
                weight_ptr=f,
                mask_ptr=f,
                lags_ptr="*i32",
                coef_ptr="*fp64",
                const_ptr="*fp64",
                trace_ptr=f,
                slope_ptr="*i8",
                support_ptr="*i8",
                state_ptr="*fp64",
                grad_h_ptr=f,
                grad_z_ptr=f,
                sums_ptr="*fp64",
                steps="i32",
                batch="i32",
                n="i32",
            ),
            dict(
                DTYPE=dtype,
                SOFT_RESET=False,
                DETACH_RESET=False,
                SURROGATE=2,
                HAS_MASK=True,
                NEED_SLOPE=True,
                NEED_SUPPORT=True,
                BLOCK_R=wide.recursion,
                **axonal_rec,
            ),
            wide.warps,
        )
        for synaptic_delays in (False, True):
            inner = ring.synaptic_inner(tiles) if synaptic_delays else tiles.inner
            yield (
                ring._ring_kernel,
                dict(
                    drive_ptr=f,
                    weight_ptr=f,
                    mask_ptr=f,
                    lags_ptr="*i32",
                    const_ptr="*fp64",
                    history_ptr="*u8",
                    spikes_ptr=f,
                    membrane_ptr=f,
                    steps="i32",
                    batch="i32",
                    n="i32",
                ),
                dict(
                    DTYPE=dtype,
                    SOFT_RESET=True,
                    HAS_MASK=True,
                    SYNAPTIC=synaptic_delays,
                    **{**rec, "BLOCK_K": inner},
                ),
                warps,
            )
        yield (
            synaptic._forward_kernel,
            dict(
                drive_ptr=f,
                kernel_ptr=f,
                mask_ptr=f,
                const_ptr="*fp64",
                spikes_ptr=f,
                membrane_ptr=f,
                steps="i32",
                batch="i32",
                n="i32",
                kmin="i32",
                lags="i32",
            ),
            dict(DTYPE=dtype, SOFT_RESET=False, HAS_MASK=True, **rec),
            warps,
        )
        yield (
            synaptic._backward_kernel,
            dict(
                grad_spikes_ptr=f,
                membrane_ptr=f,
                psi_ptr=f,
                kernel_ptr=f,
                mask_ptr=f,
                const_ptr="*fp64",
                grad_h_ptr=f,
                steps="i32",
                batch="i32",
                n="i32",
                kmin="i32",
                lags="i32",
            ),
            dict(
                DTYPE=dtype, SOFT_RESET=False, DETACH_RESET=True, SURROGATE=0, HAS_MASK=True, **rec
            ),
            warps,
        )
    for dtype, f in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):
        chunks = dict(CHUNKS=fused.CHUNKS)
        yield (
            fused._lif_forward_kernel,
            dict(
                current_ptr=f,
                const_ptr="*fp64",
                masks_ptr="*i64",
                spikes_ptr=f,
                membrane_ptr=f,
                steps="i32",
                batch="i32",
                n="i32",
            ),
            dict(DTYPE=dtype, SOFT_RESET=False, MASK_IN=True, MASK_OUT=True, **chunks),
            fused.CHUNK_WARPS,
        )
        yield (
            fused._lif_backward_kernel,
            dict(
                grad_out_ptr=f,
                membrane_ptr=f,
                psi_ptr=f,
                const_ptr="*fp64",
                masks_ptr="*i64",
                grad_current_ptr=f,
                steps="i32",
                batch="i32",
                n="i32",
            ),
            dict(
                DTYPE=dtype,
                SOFT_RESET=False,
                DETACH_RESET=False,
                SURROGATE=2,
                MASK_IN=True,
                MASK_OUT=True,
                **chunks,
            ),
            fused.CHUNK_WARPS,
        )
        yield (
            fused._dropout_kernel,
            dict(x_ptr=f, out_ptr=f, mask_ptr="*i64", batch="i32", n="i32", tiles="i32"),
            dict(DTYPE=dtype, HAS_X=True, **chunks),
            fused.CHUNK_WARPS,
        )
        yield (
            fused._leaky_kernel,
            dict(
                input_ptr=f,
                output_ptr=f,
                initial_ptr=f,
                scalars_ptr="*fp64",
                steps="i32",
                size="i32",
            ),
            dict(DTYPE=dtype, REVERSE=True, BLOCK=256),
            4,
        )
        norm = dict(BLOCK_F=fused.NORM_FRAMES, BLOCK_N=fused.NORM_CHANNELS, FRAMES=fused.FRAMES)
        yield (
            fused._moments_kernel,
            dict(a_ptr=f, x_ptr=f, centre_ptr=f, partial_ptr="*fp64", frames="i32", n="i32"),
            dict(CENTRED=True, **norm),
            4,
        )
        yield (
            fused._normalize_kernel,
            dict(
                x_ptr=f,
                grad_ptr=f,
                centre_ptr=f,
                coef_ptr=f,
                out_ptr=f,
                partial_ptr="*fp64",
                frames="i32",
                n="i32",
            ),
            dict(GRAD=True, **norm),
            4,
        )


def compile_one(kernel, types, constants, warps):
    """Compiles one variant; returns (seconds, shared bytes, registers, spilled bytes)."""
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, signature, constants), target=TARGET, options={"num_warps": warps}
    )
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [str(PTXAS), "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return seconds, compiled.metadata.shared, registers, spilled


def main() -> int:
    failed = 0
    for kernel, types, constants, warps in variants():
        flags = " ".join(
            f"{k}={getattr(v, 'name', v)}"
            for k, v in constants.items()
            if not k.startswith("BLOCK")
        )
        try:
            seconds, shared, registers, spilled = compile_one(kernel, types, constants, warps)
        except Exception as error:  # noqa: BLE001 (every variant is tried and reported)
            failed += 1
            print(f"FAILED {kernel.__name__} {flags}: {type(error).__name__}: {error}")
            continue
        print(
            f"ok {kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__} {flags}: "
            f"{seconds:.1f} s, {shared} B shared, {registers} registers, {spilled} B spilled"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The GPU check: the Triton kernels' tests compiled on CUDA, then the quick GPU benchmark.
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]      stages: env tests bench (default: all three)
#   benchmarks/gpu_check.sh --dry-run OUTDIR [...]  the same on this CPU, Triton's interpreter,
#                                                   tiny sizes (checks the script, measures nothing)
#
# Run from the repository root with the repository's Python (PYTHON, default python3) and no
# install (PYTHONPATH=src). Under 8 minutes on one H200 from a cold start (Triton compiles each
# kernel variant on first use). Every stage has its own time limit; a failed or timed-out stage
# is reported and the later ones still run. OUTDIR receives at most 7 flat files: env.txt,
# tests.log, bench.log, gpu-bench.md, gpu-bench.csv, gpu-bench.png, summary.txt. The summary
# table is printed last.
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR [env|tests|bench ...]}"
shift
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env tests bench)

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# DELREC_NATIVE=0: the CPU's C++ kernels are not built (nothing here needs them; a build would
# cost a minute of the budget)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DELREC_NATIVE=0
if [[ $DRY_RUN -eq 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
# stage limits in seconds (tests and bench include first-use compilation)
LIMIT_env=30 LIMIT_tests=250 LIMIT_bench=180
SUMMARY=()

stage_env() {
    { date -u; uname -a; nvidia-smi 2>&1 | head -20
      "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
      "$PY" -c 'import triton; print("triton", triton.__version__)'
      git log --oneline -1 2>/dev/null; } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

stage_tests() {
    # the test files in parallel: their kernels compile at the same time
    local pids=() status=0 file part
    for file in tests/test_triton_*.py; do
        part="$OUT/tests.$(basename "$file" .py).part"
        { echo "== $file"; "$PY" -m pytest -q -rs -p no:cacheprovider "$file" 2>&1; } > "$part" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    cat "$OUT"/tests.*.part > "$OUT/tests.log"
    rm -f "$OUT"/tests.*.part
    grep -E "^== |^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -40
    return $status
}

stage_bench() {
    local extra=(--quick)
    [[ $DRY_RUN -eq 1 ]] && extra+=(--dry-run)
    "$PY" -m delrec bench --device cuda "${extra[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
}

for stage in "${STAGES[@]}"; do
    limit_var="LIMIT_$stage"
    if ! declare -F "stage_$stage" > /dev/null; then
        SUMMARY+=("$(printf '%-6s %-8s %s' "$stage" "UNKNOWN" "no such stage (env, tests, bench)")")
        continue
    fi
    echo "=== stage $stage (limit ${!limit_var} s) ==="
    start=$SECONDS
    export -f "stage_$stage"
    export OUT PY DRY_RUN
    timeout --kill-after=10 "${!limit_var}" bash -c "stage_$stage"
    rc=$?
    took=$((SECONDS - start))
    case $rc in
        0) verdict=OK ;;
        124|137) verdict=TIMEOUT ;;
        *) verdict="FAILED($rc)" ;;
    esac
    SUMMARY+=("$(printf '%-6s %-10s %4d s' "$stage" "$verdict" "$took")")
done

{
    echo
    echo "=== gpu_check summary ($([[ $DRY_RUN -eq 1 ]] && echo 'dry run, interpreter' || echo GPU)) ==="
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -f "$OUT/tests.log" ]]; then
        awk '/^== /{file=$2} /[0-9]+ (passed|failed|error)/{print "  " file ": " $0}' \
            "$OUT/tests.log"
        grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -10
    fi
    if [[ -f "$OUT/bench.log" ]]; then
        echo "bench targets ($OUT/bench.log):"
        grep -E "^(PASS|FAIL)|samples/s, rsnn" "$OUT/bench.log"
    fi
    echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"

#!/usr/bin/env bash
# The GPU check: the Triton kernels' tests compiled on CUDA, then the quick GPU benchmark.
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]      stages: env tests bench (default: all three),
#                                                   tests-quick (a short list of test files)
#   benchmarks/gpu_check.sh --dry-run OUTDIR [...]  the same on this CPU, Triton's interpreter,
#                                                   tiny sizes (checks the script, measures nothing)
#
# tests-quick runs the test files or pytest node ids in QUICK_TESTS (whitespace-separated;
# default: tests/test_triton_fused.py, the fused network's kernels), each in its own process,
# all at once, for a short GPU window: `benchmarks/gpu_check.sh OUT env tests-quick`.
#
# Run from the repository root with the repository's Python (PYTHON, default python3) and no
# install (PYTHONPATH=src). Under 8 minutes on one H200 from a cold start (Triton compiles each
# kernel variant on first use). Every stage has its own time limit; a failed or timed-out stage
# is reported and the later ones still run. OUTDIR receives at most 8 flat files: env.txt,
# tests.log, tests-quick.log, bench.log, gpu-bench.md, gpu-bench.csv, gpu-bench.png,
# summary.txt. The summary table is printed last.
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR [env|tests|tests-quick|bench ...]}"
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
LIMIT_env=30 LIMIT_tests=250 LIMIT_tests_quick=150 LIMIT_bench=180
QUICK_TESTS="${QUICK_TESTS:-tests/test_triton_fused.py}"
SUMMARY=()

stage_env() {
    { date -u; uname -a; nvidia-smi 2>&1 | head -20
      "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
      "$PY" -c 'import triton; print("triton", triton.__version__)'
      git log --oneline -1 2>/dev/null; } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

# run_tests LOG TARGET...: pytest on each target (file or node id) in its own process, all at
# once (their kernels compile at the same time); the outputs, in order, into $OUT/LOG
run_tests() {
    local log="$1" pids=() status=0 target i=0
    shift
    for target in "$@"; do
        i=$((i + 1))
        { echo "== $target"; "$PY" -m pytest -q -rs -p no:cacheprovider "$target" 2>&1; } \
            > "$OUT/$log.$(printf %02d $i).part" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    cat "$OUT/$log".*.part > "$OUT/$log"
    rm -f "$OUT/$log".*.part
    grep -E "^== |^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$OUT/$log" | tail -40
    return $status
}

stage_tests() {
    run_tests tests.log tests/test_triton_*.py
}

stage_tests_quick() {
    # QUICK_TESTS is a whitespace-separated list: split it here
    run_tests tests-quick.log $QUICK_TESTS
}

stage_bench() {
    set -o pipefail  # a stage runs in its own shell: a failed benchmark fails the stage
    local extra=(--quick)
    [[ $DRY_RUN -eq 1 ]] && extra+=(--dry-run)
    "$PY" -m delrec bench --device cuda "${extra[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
}

for stage in "${STAGES[@]}"; do
    name="${stage//-/_}"
    limit_var="LIMIT_$name"
    if ! declare -F "stage_$name" > /dev/null; then
        SUMMARY+=("$(printf '%-11s %-8s %s' "$stage" "UNKNOWN" "no such stage (env, tests, tests-quick, bench)")")
        continue
    fi
    echo "=== stage $stage (limit ${!limit_var} s) ==="
    start=$SECONDS
    export -f "stage_$name" run_tests
    export OUT PY DRY_RUN QUICK_TESTS
    timeout --kill-after=10 "${!limit_var}" bash -c "stage_$name"
    rc=$?
    took=$((SECONDS - start))
    case $rc in
        0) verdict=OK ;;
        124|137) verdict=TIMEOUT ;;
        *) verdict="FAILED($rc)" ;;
    esac
    SUMMARY+=("$(printf '%-11s %-10s %4d s' "$stage" "$verdict" "$took")")
done

{
    echo
    echo "=== gpu_check summary ($([[ $DRY_RUN -eq 1 ]] && echo 'dry run, interpreter' || echo GPU)) ==="
    printf '%s\n' "${SUMMARY[@]}"
    for log in tests.log tests-quick.log; do
        [[ -f "$OUT/$log" ]] || continue
        awk '/^== /{file=$2} /[0-9]+ (passed|failed|error)/{print "  " file ": " $0}' \
            "$OUT/$log"
        grep -E "^(FAILED|ERROR) " "$OUT/$log" | head -10
    done
    if [[ -f "$OUT/bench.log" ]]; then
        echo "bench targets ($OUT/bench.log):"
        grep -E "^(PASS|FAIL)|samples/s, rsnn" "$OUT/bench.log"
    fi
    echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"

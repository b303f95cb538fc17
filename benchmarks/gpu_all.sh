#!/usr/bin/env bash
# Every GPU check of normlab in one invocation (issue 6), all output under $OUT:
#   phase 0, in parallel: the CUDA tests, and a compile-only pass of every timed step (normlab's Triton kernels and
#            torch.compile's graphs land in their disk caches, so the timed steps spend their time timing);
#   phase 1, one at a time: benchmarks/gpu_tune.py (the launch-constant sweep; `host`: only its host costs per call),
#            `normlab bench kernels`, `normlab bench resnet50 --compile`.
#
#   bash benchmarks/gpu_all.sh                  # writes ./gpu_out/
#   OUT=/tmp/x T_RESNET=400 bash benchmarks/gpu_all.sh
#
# Needs a CUDA machine with python3, torch, triton, numpy, pytest and hypothesis; installs nothing (normlab runs from
# src/ through PYTHONPATH, so no network and no pip are needed). A failed or timed-out step does not stop the
# others; the summary at the end (also $OUT/summary.txt) gives each step's status. Exit status: 0 when every step
# passed, 1 otherwise. The limits below add up to at most 10 minutes on an H100. See benchmarks/README.md.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
T_WARM="${T_WARM:-140}"                # phase 0: the CUDA tests and the compile-only runs, in parallel
T_KERNELS="${T_KERNELS:-150}"           # normlab bench kernels
T_RESNET="${T_RESNET:-170}"             # normlab bench resnet50 (each torch.compile of the model takes ~45 s cold)
T_TUNE="${T_TUNE:-90}"                 # benchmarks/gpu_tune.py
T_HOST="${T_HOST:-60}"                 # benchmarks/gpu_tune.py --host (step "host")
RESNET_STEPS="${RESNET_STEPS:-20}"     # timed steps per ResNet-50 setting (median)
RESNET_ROUNDS="${RESNET_ROUNDS:-1}"    # rounds of every ResNet-50 setting, A-B-B-A (2 about doubles T_RESNET's need)
WARM_SHARDS="${WARM_SHARDS:-8}"         # parallel compile-only processes of gpu_tune.py
KERNELS_COMPILE="${KERNELS_COMPILE:-bf16-cl}"         # bench kernels --compile: all | bf16-cl | none
RESNET_COMPILE="${RESNET_COMPILE-b64-bf16-cl}"        # configs to compile in; empty: every config; "none": eager only
RESNET_GRAPH="${RESNET_GRAPH:-1}"                      # 1: bench resnet50 also times CUDA-graph replays (--graph)
STEPS="${STEPS:-tests tune kernels resnet}"           # the steps to run (in this order, whatever the order given);
                                                      # also "host" (instead of or after "tune")
has() { [[ " $STEPS " == *" $1 "* ]]; }
# bench resnet50's options (bash cannot export arrays: phase0 below rebuilds them with the same function)
resnet_args() {
    RESNET_ARGS=()
    # shellcheck disable=SC2206  # RESNET_COMPILE is a list of config names
    [ "$RESNET_COMPILE" = none ] || RESNET_ARGS=(--compile $RESNET_COMPILE)
    [ "$RESNET_GRAPH" != 1 ] || RESNET_ARGS+=(--graph)
}
resnet_args

mkdir -p "$OUT"
LOG="$OUT/run.log"     # every step's output (the fetched files are few: one log, the CSVs, the summary)
WARM="$(mktemp -d)"    # the compile-only runs' CSVs (their times mean nothing: they ran side by side)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET NORMLAB_BACKEND  # real kernels on the GPU, the default dispatch in the tests
# the CSVs record the commit; a copy of the repository without .git gets it from the caller
NORMLAB_GIT_COMMIT="${NORMLAB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"
export NORMLAB_GIT_COMMIT

SUMMARY="$OUT/summary.txt"
RESULTS=()
FAILED=0

# step NAME LIMIT_S LOG CMD...: run CMD under `timeout`, append its output to LOG, record its status
step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc status from
    shift 3
    from=$(cat "$log" 2>/dev/null | wc -l)
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    timeout -k 15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        5) status="no tests collected" ;;  # pytest's code: e.g. no GPU-marked tests yet
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || FAILED=1
    RESULTS+=("$(printf '%-14s %-26s %5d s   %s' "$name" "$status" $((SECONDS - start)) "$(basename "$log")")")
    echo "== $name: $status ($((SECONDS - start)) s)" | tee -a "$log"
    if [ "$status" != "ok" ]; then tail -n +"$((from + 1))" "$log" | tail -n 15; fi
}

{
    echo "normlab GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${NORMLAB_GIT_COMMIT:-unknown}"
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("CUDA: NOT AVAILABLE (the steps below need it)")
EOF
} | tee "$OUT/env.txt"

# phase 0: everything that compiles, side by side (16 CPU cores compile in parallel); the CUDA tests with it
phase0() {
    local rc=0 tests_pid="" op setting i
    if has tests; then
        "$PY" -m pytest -q -m gpu tests/kernels tests/lab/test_study_speed.py >"$OUT/tests.log" 2>&1 &
        tests_pid=$!
    fi
    if has kernels; then
        for op in gn in bn ln2d rms2d frn evo_s0 "ln rms"; do
            # shellcheck disable=SC2086  # "ln rms": two ops in one process
            "$PY" -m normlab.lab.cli bench kernels --ops $op --compile "$KERNELS_COMPILE" --no-graph \
                --out "$WARM/k-${op// /-}.csv" >>"$OUT/warm.log" 2>&1 &
        done
    fi
    if has resnet; then
        for setting in torch-bn normlab-bn normlab-gn torch-gn none normlab-bn-auto normlab-gn-auto normlab-bn-auto-gpu \
            normlab-gn-auto-gpu normlab-bn-noguard-auto; do
            "$PY" -m normlab.lab.cli bench resnet50 --settings "$setting" --steps 1 --warmup 1 \
                "${RESNET_ARGS[@]}" --out "$WARM/r-$setting.csv" >>"$OUT/warm.log" 2>&1 &
        done
    fi
    if has tune; then
        for ((i = 0; i < WARM_SHARDS; i++)); do
            "$PY" benchmarks/gpu_tune.py --warm --shard "$i" --shards "$WARM_SHARDS" >>"$OUT/warm.log" 2>&1 &
        done
    fi
    if [ -n "$tests_pid" ]; then
        wait "$tests_pid"  # the tests' status is this phase's (their output: $OUT/tests.log)
        rc=$?
        tail -n 3 "$OUT/tests.log"
    fi
    wait
    return "$rc"
}
export -f phase0 has resnet_args
export PY OUT WARM KERNELS_COMPILE RESNET_COMPILE RESNET_GRAPH WARM_SHARDS STEPS
step phase0-tests "$T_WARM" "$LOG" bash -c 'resnet_args; phase0'
if has tune; then
    step tune "$T_TUNE" "$LOG" "$PY" benchmarks/gpu_tune.py --out "$OUT/tune.csv"
fi
if has host; then
    step host "$T_HOST" "$LOG" "$PY" benchmarks/gpu_tune.py --host
fi
if has kernels; then
    step bench-kernels "$T_KERNELS" "$LOG" \
        "$PY" -m normlab.lab.cli bench kernels --compile "$KERNELS_COMPILE" --out "$OUT/kernels.csv"
fi
if has resnet; then
    step bench-resnet50 "$T_RESNET" "$LOG" \
        "$PY" -m normlab.lab.cli bench resnet50 "${RESNET_ARGS[@]}" --steps "$RESNET_STEPS" --rounds "$RESNET_ROUNDS" \
        --out "$OUT/resnet50.csv"
fi

{
    cat "$OUT/env.txt"
    echo
    echo "step           status                      time     log"
    printf '%s\n' "${RESULTS[@]}"
    if [ -f "$OUT/resnet50-targets.csv" ]; then
        echo
        echo "ResNet-50 target ratios (config, ratio, value, target, met):"
        cut -d, -f1,2,5,6,7 "$OUT/resnet50-targets.csv" | tail -n +2
    fi
} >"$SUMMARY"
rm -f "$OUT/env.txt"  # now part of the summary (fewer files to fetch back)
echo
cat "$SUMMARY"
exit "$FAILED"

#!/usr/bin/env bash
# GPU validation in one script: nvidia-smi, the GPU-marked tests, then every benchmark at full size.
#
#   benchmarks/gpu_check.sh OUT_DIR [--tiny] [--only fusion,loader,...]
#
# Meant for a machine with an NVIDIA GPU and no internet, inside an environment that already has the
# project's dependencies (it installs nothing; `src/` is put on PYTHONPATH, so no `pip install -e`
# is needed). Each step has its own time limit so the whole script ends in under 8 minutes, and a
# failed or timed-out step never stops the later ones. Writes into OUT_DIR:
#   nvidia-smi.txt   nvidia-smi output
#   gpu_tests.log    pytest -m gpu tests/gpu   (+ gpu_tests.xml, JUnit)
#   profile.log      python -m benchmarks.profile_step: the PCT-Net step's kernels ranked (+ profile.json)
#   bench.log        python -m benchmarks --device cuda (progress and the JSON document)
#   gpu.json         the benchmark JSON (written after every module, so a timeout keeps what finished)
#   BENCHMARKS.md    the report rendered from gpu.json alone, for a first look
#   status.txt       one line per step: name, exit status, seconds (124 = timed out); then "overall"
# --tiny: tiny benchmark sizes, on the GPU when there is one, else on the CPU (to try the script
# anywhere). --only: run these benchmarks, in this order. The default order puts the GPU figures
# first (fusion, network, predict, engine), then the CPU-bound loader and store, then nnunet (ResEnc-L
# from nnU-Net's planner beside PCT-Net; needs the extra volumefusion[nnunet]), so that a run cut
# short by its time limit loses the least relevant ones; scale (store start-up, CPU and disk only,
# minutes at full size) is left to CPU runs (benchmarks.run.CPU_ONLY).
# Environment: PYTHON (default: python, else python3), TESTS_TIMEOUT (120 s), PROFILE_TIMEOUT (60 s),
# BENCH_TIMEOUT (270 s), VF_COMMIT (the commit to record where the copy has no git metadata).
# Exit status: 0 when every step succeeded (nvidia-smi is not required with --tiny), else 1.

set -u -o pipefail

usage() {
    sed -n '4p' "$0" | sed 's/^#  *//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
case $1 in -*) usage ;; esac
OUT_DIR=$1
shift
TINY=0
ONLY=(--only fusion,network,predict,engine,loader,store,nnunet)
while [ $# -gt 0 ]; do
    case $1 in
        --tiny) TINY=1 ;;
        --only) [ $# -ge 2 ] || usage; ONLY=(--only "$2"); shift ;;
        *) usage ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STATUS=$OUT_DIR/status.txt
: >"$STATUS"
OVERALL=0

# step NAME TIMEOUT_S LOG REQUIRED COMMAND...: run COMMAND with a time limit, its output shown and
# copied to LOG, and record "NAME EXIT SECONDSs" in status.txt; a REQUIRED (1) step that fails
# makes the script's exit status 1. pytest's 5 (no tests collected) is not a failure.
step() {
    local name=$1 limit=$2 log=$3 required=$4
    shift 4
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local note="" failed=0
    [ "$rc" -ne 0 ] && failed=$required
    if [ "$rc" -eq 124 ]; then
        note=" (timed out)"
    elif [ "$rc" -eq 5 ] && [ "$name" = gpu_tests ]; then
        note=" (no tests collected)"
        failed=0
    fi
    echo "$name $rc $((SECONDS - start))s$note" >>"$STATUS"
    echo "== $name: exit $rc$note after $((SECONDS - start)) s"
    [ "$failed" -eq 1 ] && OVERALL=1
}

if [ "$TINY" -eq 1 ]; then
    DEVICE=auto
    TINY_FLAG=(--tiny)
else
    DEVICE=cuda
    TINY_FLAG=()
fi

echo "== python: $PYTHON; out: $OUT_DIR; tiny: $TINY; device: $DEVICE"
step nvidia-smi 15 "$OUT_DIR/nvidia-smi.txt" $((1 - TINY)) nvidia-smi
step gpu_tests "${TESTS_TIMEOUT:-120}" "$OUT_DIR/gpu_tests.log" 1 \
    "$PYTHON" -m pytest -m gpu tests/gpu -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
step profile "${PROFILE_TIMEOUT:-60}" "$OUT_DIR/profile.log" 1 \
    "$PYTHON" -m benchmarks.profile_step --device "$DEVICE" "${TINY_FLAG[@]}" --out "$OUT_DIR/profile.json"
step benchmarks "${BENCH_TIMEOUT:-270}" "$OUT_DIR/bench.log" 1 \
    "$PYTHON" -m benchmarks --device "$DEVICE" "${TINY_FLAG[@]}" "${ONLY[@]}" --out "$OUT_DIR/gpu.json"
step report 20 /dev/null 1 \
    "$PYTHON" -m benchmarks.report "$OUT_DIR/gpu.json" --include-tiny --out "$OUT_DIR/BENCHMARKS.md"

echo "overall $OVERALL" >>"$STATUS"
echo "== status ($STATUS):"
cat "$STATUS"
exit "$OVERALL"

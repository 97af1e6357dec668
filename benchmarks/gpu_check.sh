#!/usr/bin/env bash
# GPU validation in one script: nvidia-smi, the GPU-marked tests, a kernel profile, every benchmark
# at full size, torch.compile, nnU-Net's ResEnc-L and the whole demo on the device.
#
#   benchmarks/gpu_check.sh OUT_DIR [--tiny] [--only fusion,network,...]
#
# Meant for a machine with an NVIDIA GPU and no internet, inside an environment that already has the
# project's dependencies (it installs nothing; `src/` is put on PYTHONPATH, so no `pip install -e`
# is needed). Each step has its own time limit so the whole script ends in under 8 minutes (the
# limits add up to 465 s), and a failed or timed-out step never stops the later ones. Writes into OUT_DIR:
#   nvidia-smi.txt   nvidia-smi output
#   gpu_tests.log    pytest -m gpu tests/gpu   (+ gpu_tests.xml, JUnit)
#   profile.log      python -m benchmarks.profile_step: the PCT-Net step's kernels ranked (+ profile.json)
#   bench.log        python -m benchmarks --device cuda (progress and the JSON document)
#   gpu.json         the benchmark JSON (written after every module, so a timeout keeps what finished)
#   compile.log/.json  the bf16 + torch.compile step (benchmarks.compile), with its own allowance
#   nnunet.log/.json   ResEnc-L beside PCT-Net (benchmarks.nnunet; a required step only where
#                      nnunetv2 is installed)
#   demo.log, demo-report.md, demo-report.json  `volumefusion demo --device cuda` (--quick with --tiny);
#                      its wall time is the demo line of status.txt
#   BENCHMARKS.md    the report rendered from this run's JSON files alone, for a first look
#   status.txt       one line per step: name, exit status, seconds (124 = timed out); then "overall"
# The device tool brings back at most 8 files: run it as
#   bash benchmarks/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc
# --tiny: tiny benchmark sizes, on the GPU when there is one, else on the CPU (to try the script
# anywhere). --only: the benchmarks of the main step, in this order (default: fusion, network,
# predict, engine: the GPU figures; loader, store and scale measure the host and come from CPU runs).
# Environment: PYTHON (default: python, else python3), step limits in seconds TESTS_TIMEOUT (50),
# PROFILE_TIMEOUT (40), BENCH_TIMEOUT (150), COMPILE_TIMEOUT (100), NNUNET_TIMEOUT (35),
# DEMO_TIMEOUT (60), VF_COMMIT (the commit to record where the copy has no git metadata), GPU_CHECK_SKIP
# (step names to leave out, e.g. "nnunet demo"; status.txt says "skipped").
# Exit status: 0 when every required step succeeded (nvidia-smi is not required with --tiny), else 1.

set -u -o pipefail

usage() {
    sed -n '5p' "$0" | sed 's/^#  *//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
case $1 in -*) usage ;; esac
OUT_DIR=$1
shift
TINY=0
ONLY=(--only fusion,network,predict,engine)
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
    case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
        echo "$name skipped" >>"$STATUS"
        echo "== $name: skipped (GPU_CHECK_SKIP)"
        return ;;
    esac
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
    DEMO_QUICK=--quick
else
    DEVICE=cuda
    TINY_FLAG=()
    DEMO_QUICK=
fi

echo "== python: $PYTHON; out: $OUT_DIR; tiny: $TINY; device: $DEVICE"
step nvidia-smi 15 "$OUT_DIR/nvidia-smi.txt" $((1 - TINY)) nvidia-smi
step gpu_tests "${TESTS_TIMEOUT:-50}" "$OUT_DIR/gpu_tests.log" 1 \
    "$PYTHON" -m pytest -m gpu tests/gpu -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
step profile "${PROFILE_TIMEOUT:-40}" "$OUT_DIR/profile.log" 1 \
    "$PYTHON" -m benchmarks.profile_step --device "$DEVICE" "${TINY_FLAG[@]}" --out "$OUT_DIR/profile.json"
step benchmarks "${BENCH_TIMEOUT:-150}" "$OUT_DIR/bench.log" 1 \
    "$PYTHON" -m benchmarks --device "$DEVICE" "${TINY_FLAG[@]}" "${ONLY[@]}" --out "$OUT_DIR/gpu.json"
# torch.compile of the paper model takes minutes: its own step and allowance, so it costs no other figure.
step compile "${COMPILE_TIMEOUT:-100}" "$OUT_DIR/compile.log" 1 \
    "$PYTHON" -m benchmarks --device "$DEVICE" "${TINY_FLAG[@]}" --only compile --out "$OUT_DIR/compile.json"
# ResEnc-L from nnU-Net's planner: required only where the extra volumefusion[nnunet] is installed.
NNUNET_REQUIRED=0
"$PYTHON" -c "import nnunetv2, dynamic_network_architectures" 2>/dev/null && NNUNET_REQUIRED=1
[ "$NNUNET_REQUIRED" -eq 0 ] && echo "== nnunet: nnunetv2 is not installed here; its step may fail without failing the script"
step nnunet "${NNUNET_TIMEOUT:-35}" "$OUT_DIR/nnunet.log" "$NNUNET_REQUIRED" \
    "$PYTHON" -m benchmarks --device "$DEVICE" "${TINY_FLAG[@]}" --only nnunet --out "$OUT_DIR/nnunet.json"
# The whole demo on the device (--quick with --tiny); its wall time is the step's seconds in status.txt.
DEMO_DIR=$(mktemp -d)
step demo "${DEMO_TIMEOUT:-60}" "$OUT_DIR/demo.log" 1 \
    "$PYTHON" -m volumefusion demo --device "$DEVICE" --out "$DEMO_DIR/demo" ${DEMO_QUICK}
for f in report.md report.json; do
    [ -f "$DEMO_DIR/demo/$f" ] && cp "$DEMO_DIR/demo/$f" "$OUT_DIR/demo-$f"
done
rm -rf "$DEMO_DIR"
JSONS=()
for f in gpu compile nnunet; do
    [ -f "$OUT_DIR/$f.json" ] && JSONS+=("$OUT_DIR/$f.json")
done
step report 15 /dev/null 1 \
    "$PYTHON" -m benchmarks.report "${JSONS[@]}" --include-tiny --out "$OUT_DIR/BENCHMARKS.md"

echo "overall $OVERALL" >>"$STATUS"
echo "== status ($STATUS):"
cat "$STATUS"
exit "$OVERALL"

#!/usr/bin/env bash
# One-call GPU verification for a machine with an NVIDIA GPU and no package registry (torch + triton
# already installed; reference machine: H200, Python 3.12, torch 2.11, triton 3.6, nvcc 13.0):
#   1. build:    pip install --no-build-isolation --no-deps -e .          -> build.log
#   2. tests:    pytest tests/ (Triton kernels compiled for real, no TRITON_INTERPRET) -> pytest.log
#                python -m convmixer_kernels verify --device cuda --dtypes fp32,bf16,fp16 -> verify.log
#                AMP (fp16/bf16 CUDA autocast, whole models) and a 1-GPU DDP smoke test of
#                examples/train_ddp.py --amp --sync-bn (NCCL)                -> appended to pytest.log
#   3. memcheck: compute-sanitizer on a tiny script through the `cuda` backend, when built -> memcheck.log
#                (the same log also gets the cross-layer benchmark: bench_cross_layer.py --device cuda)
#   4. bench:    python -m convmixer_kernels bench, its CUDA profile (the blocks at ConvMixer-1536/20 and
#                -768/32 shapes; convmixer_kernels/benchmark.py) -> bench.log, bench_cuda.csv,
#                bench_cuda.json (ceilings, target ratios, triton-vs-cuda winners); no plots
#   5. inspect:  python -m convmixer_kernels inspect (static report of the CUDA kernels, sm_90; its nvcc
#                compile starts in the background after the build) with --measured bench_cuda.csv:
#                measured / static per kernel                                 -> inspect.log
# then prints a short summary LAST. env.log: nvidia-smi, versions, the summary again. 8 files at most.
#
#   benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT if set, else ./gpu_out)
#
# Time: everything under TOTAL_S (default 470 s). Every step runs under `timeout`; a failing or
# timed-out step never stops the later ones. The benchmark gets whatever time is left (at least
# BENCH_MIN_S). Knobs (env): TOTAL_S, BUILD_TIMEOUT, TEST_TIMEOUT, VERIFY_TIMEOUT, MEMCHECK_TIMEOUT,
# BENCH_MIN_S, BENCH_TUNE (autotune configs kept per Triton kernel in the benchmark; default 1, "all"
# for every config: every config of every kernel compiles once per dtype/shape/act, and a k=9
# depthwise kernel took 15-60 s to compile on the 2-core dev machine), BENCH_ARGS (extra
# `python -m convmixer_kernels bench` arguments), PYTHON, SKIP_STEPS (e.g. "build pytest": steps not to run),
# GPU_CHECK_FORCE=1 (run without a GPU: only to test this script's flow, with BENCH_ARGS=--dry-run).
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${1:-${OUT:-./gpu_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
TOTAL_S=${TOTAL_S:-470}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-150}
TEST_TIMEOUT=${TEST_TIMEOUT:-140}
VERIFY_TIMEOUT=${VERIFY_TIMEOUT:-60}
MEMCHECK_TIMEOUT=${MEMCHECK_TIMEOUT:-45}
AMP_DDP_TIMEOUT=${AMP_DDP_TIMEOUT:-90}
CROSS_TIMEOUT=${CROSS_TIMEOUT:-45}
INSPECT_S=${INSPECT_S:-60}
BENCH_MIN_S=${BENCH_MIN_S:-60}
BENCH_TUNE=${BENCH_TUNE:-1}
SKIP_STEPS=${SKIP_STEPS:-}
unset TRITON_INTERPRET                  # compile the Triton kernels for the GPU
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
  done
fi
ENVLOG="$OUTDIR/env.log"
{
  echo "== gpu_check $(date -u +%FT%TZ)  repo=$REPO  git=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty')"
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not found or failed"
  echo "== nvcc"; nvcc --version 2>&1 | tail -2 || true
  echo "== compute-sanitizer: $(command -v compute-sanitizer || echo absent)"
  echo "== python: ${PY:-none}"
  [ -n "$PY" ] && "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1
  [ -n "$PY" ] && "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$ENVLOG"

if [ -z "$PY" ]; then
  echo "gpu_check: no python with torch found (set PYTHON=...)" | tee -a "$ENVLOG"; exit 2
fi
if [ "${GPU_CHECK_FORCE:-0}" != 1 ] && { ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1 \
   || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi / torch.cuda.is_available()); nothing to check. See $ENVLOG" | tee -a "$ENVLOG"
  exit 2
fi

NAMES=(); RCS=(); SECS=(); NOTES=()
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# run_step NAME TIMEOUT LOG CMD...: runs CMD under timeout (SIGINT first: pytest still prints its summary)
run_step() {
  local name=$1 t=$2 logf=$3; shift 3
  local l; l=$(left)
  if [[ " ${SKIP_STEPS//,/ } " == *" $name "* ]]; then
    NAMES+=("$name"); RCS+=("skip"); SECS+=(0); NOTES+=("SKIP_STEPS"); echo "[gpu_check] $name: skipped (SKIP_STEPS)"; return
  fi
  if [ "${CLAMP:-1}" = 1 ] && [ "$t" -gt $(( l - 20 )) ]; then t=$(( l - 20 )); fi
  if [ "$t" -lt 10 ]; then
    NAMES+=("$name"); RCS+=("skip"); SECS+=(0); NOTES+=("no time left"); echo "[gpu_check] $name: skipped (no time left)"; return
  fi
  echo "[gpu_check] $name (timeout ${t}s) -> $(basename "$logf")"
  local t0; t0=$(date +%s)
  { echo "\$ $*"; } >> "$logf"
  timeout -s INT -k 20 "$t" "$@" >> "$logf" 2>&1
  local rc=$?
  NAMES+=("$name"); RCS+=("$rc"); SECS+=($(( $(date +%s) - t0 )))
  if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then NOTES+=("TIMED OUT after ${t}s"); else NOTES+=(""); fi
}
note() { NOTES[$(( ${#NOTES[@]} - 1 ))]="${NOTES[$(( ${#NOTES[@]} - 1 ))]} $*"; }

# 1. build against the installed torch
: > "$OUTDIR/build.log"
run_step build "$BUILD_TIMEOUT" "$OUTDIR/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps -e .
"$PY" -m convmixer_kernels info >> "$OUTDIR/build.log" 2>&1
note "$(grep -E '^\s+(triton|cuda) ' "$OUTDIR/build.log" | awk '{printf "%s=%s ", $1, $2}')"

# the static report's nvcc compile (sm_90 cubins, cached by source digest) runs while the tests do
INSPECT_DIR=/tmp/cmk_inspect
( "$PY" -m convmixer_kernels inspect --arch 90 --no-triton --dtypes bf16 --out "$INSPECT_DIR" > /tmp/cmk_inspect_pre.log 2>&1 ) &
INSPECT_PID=$!

# 2. tests (the AOT/SASS compile tests are for GPU-less machines: skipped here) and the numerics report
: > "$OUTDIR/pytest.log"
run_step pytest "$TEST_TIMEOUT" "$OUTDIR/pytest.log" "$PY" -m pytest -q -ra -p no:cacheprovider --durations=15 \
  --ignore=tests/test_triton_aot.py --ignore=tests/test_cuda_sass.py tests/
note "$(grep -E '(passed|failed|error)' "$OUTDIR/pytest.log" | grep -E ' in [0-9.]+s' | tail -1)"
: > "$OUTDIR/verify.log"
# fp64 is left to the tests (test_cuda.py): its Triton compiles would not fit VERIFY_TIMEOUT
run_step verify "$VERIFY_TIMEOUT" "$OUTDIR/verify.log" "$PY" -m convmixer_kernels verify --device cuda \
  --dtypes fp32,bf16,fp16
note "$(grep -c '^  PASS' "$OUTDIR/verify.log") PASS, $(grep -c '^  FAIL' "$OUTDIR/verify.log") FAIL"
# AMP on the GPU (the CUDA cases of the whole-model autocast tests) and DDP + fused sync BN over NCCL
AMPDDP=$(mktemp /tmp/cmk_amp_ddp_XXXX.sh)
cat > "$AMPDDP" <<AMPEOF
set -e
"$PY" -m pytest -q -p no:cacheprovider tests/test_amp.py -k cuda
"$PY" -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29533 \
  examples/train_ddp.py --device cuda --amp --sync-bn --epochs 1 --max-steps-per-epoch 8 --out /tmp/cmk_ddp.png
AMPEOF
echo "== amp_ddp" >> "$OUTDIR/pytest.log"
run_step amp_ddp "$AMP_DDP_TIMEOUT" "$OUTDIR/pytest.log" bash "$AMPDDP"
note "$(grep -E 'passed|failed' "$OUTDIR/pytest.log" | tail -1 | cut -c1-80); $(grep -E 'final test accuracy' "$OUTDIR/pytest.log" | tail -1)"
rm -f "$AMPDDP"

# 3. compute-sanitizer memcheck through the cuda backend (tiny shapes)
: > "$OUTDIR/memcheck.log"
TINY=$(mktemp /tmp/cmk_memcheck_XXXX.py)
cat > "$TINY" <<'EOF'
import sys, torch, torch.nn as nn
from convmixer_kernels import backends
from convmixer_kernels.convert import convert
from convmixer_kernels.reference import Residual, make_act
ok, why = backends.available_backends()["cuda"]
if not ok:
    print("cuda backend not built:", why); sys.exit(3)
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for cl in (False, True):
        for k, dim, hw in ((9, 24, 9), (4, 5, 7)):
            layer = nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"),
                                                         make_act("gelu"), nn.BatchNorm2d(dim))),
                                  nn.Conv2d(dim, dim + 3, 1), make_act("relu"), nn.BatchNorm2d(dim + 3))
            stem = nn.Sequential(nn.Conv2d(3, dim, 2, stride=2), make_act("gelu_tanh"), nn.BatchNorm2d(dim))
            for m, cin in ((layer, dim), (stem, 3)):
                m = m.cuda().to(dtype)
                for mod in m.modules():
                    if isinstance(mod, nn.BatchNorm2d):
                        mod.float()
                f = convert(m, backend="cuda")
                x = torch.randn(2, cin, hw, hw, device="cuda", dtype=dtype)
                if cl:
                    f, x = f.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                for training in (True, False):
                    f.train(training)
                    xi = x.clone().requires_grad_(True)
                    y = f(xi)
                    y.backward(torch.randn_like(y))
                    torch.cuda.synchronize()
print("memcheck script finished")
EOF
if ! command -v compute-sanitizer >/dev/null; then
  echo "compute-sanitizer not found: memcheck skipped" >> "$OUTDIR/memcheck.log"
  NAMES+=(memcheck); RCS+=(skip); SECS+=(0); NOTES+=("compute-sanitizer absent")
elif ! "$PY" -c "import sys; from convmixer_kernels import backends; sys.exit(0 if backends.available_backends()['cuda'][0] else 1)" >> "$OUTDIR/memcheck.log" 2>&1; then
  "$PY" -c "from convmixer_kernels import backends; print('cuda backend unavailable:', backends.available_backends()['cuda'][1])" >> "$OUTDIR/memcheck.log" 2>&1
  NAMES+=(memcheck); RCS+=(skip); SECS+=(0); NOTES+=("cuda backend not built")
else
  run_step memcheck "$MEMCHECK_TIMEOUT" "$OUTDIR/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
    --print-limit 20 "$PY" "$TINY"
  note "$(grep -E 'ERROR SUMMARY' "$OUTDIR/memcheck.log" | tail -1)"
fi
rm -f "$TINY"

# 4. benchmarks: cross-layer fusion on/off, then whatever time is left but the inspect step's (budget
#    inside the script, so it writes its CSV before the cap)
: > "$OUTDIR/bench.log"
run_step cross_layer "$CROSS_TIMEOUT" "$OUTDIR/bench.log" "$PY" benchmarks/bench_cross_layer.py --device cuda --reps 5
note "$(grep -E '^(train|eval)' "$OUTDIR/bench.log" | awk '{printf "%s %s ", $1, $NF}')"
L=$(left); BT=$(( L - 15 - INSPECT_S )); [ "$BT" -lt "$BENCH_MIN_S" ] && BT=$BENCH_MIN_S
BUDGET=$(( BT - 45 )); [ "$BUDGET" -lt 30 ] && BUDGET=30
CAP=$(( BUDGET / 3 )); [ "$CAP" -gt 150 ] && CAP=150
CLAMP=0 run_step bench "$BT" "$OUTDIR/bench.log" "$PY" -m convmixer_kernels bench --no-verify --no-plots \
  --out "$OUTDIR" --budget-s "$BUDGET" --compile-timeout-s "$CAP" --tune "$BENCH_TUNE" ${BENCH_ARGS:-}
note "budget ${BUDGET}s, max-autotune cap ${CAP}s, tune=$BENCH_TUNE"

# 5. the static report, with measured / static for the kernels the benchmark times alone
: > "$OUTDIR/inspect.log"
for _ in $(seq 1 "$INSPECT_S"); do kill -0 "$INSPECT_PID" 2>/dev/null || break; sleep 1; done  # bounded wait
kill "$INSPECT_PID" 2>/dev/null
cat /tmp/cmk_inspect_pre.log >> "$OUTDIR/inspect.log" 2>/dev/null
run_step inspect "$INSPECT_S" "$OUTDIR/inspect.log" "$PY" -m convmixer_kernels inspect --arch 90 --no-triton \
  --dtypes bf16,fp16 --layouts channels_last --out "$INSPECT_DIR" --measured "$OUTDIR/bench_cuda.csv"
note "$(grep -c 'measured/static' "$OUTDIR/inspect.log") measured/static rows"

# summary (last)
{
  echo
  echo "== gpu_check summary ($(( $(date +%s) - START ))s total; logs in $OUTDIR)"
  printf "%-9s %-5s %6s  %s\n" step rc secs note
  for i in "${!NAMES[@]}"; do printf "%-9s %-5s %6s  %s\n" "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"; done
  grep -E '^\[bench\] ceilings' "$OUTDIR/bench.log" | tail -1
  sed -n '/^\[bench\] target ratios:/,/^\[bench\] measured winners/p' "$OUTDIR/bench.log" | cut -c1-400
  grep -E 'measured/static' "$OUTDIR/inspect.log" | cut -c1-200
  if grep -qE '^(FAILED|ERROR) ' "$OUTDIR/pytest.log"; then
    echo "-- pytest failures (first 10):"; grep -E '^(FAILED|ERROR) ' "$OUTDIR/pytest.log" | head -10 | cut -c1-300
  fi
  if grep -q '^  FAIL' "$OUTDIR/verify.log"; then
    echo "-- verify failures (first 5):"; grep '^  FAIL' "$OUTDIR/verify.log" | head -5 | cut -c1-300
  fi
} | tee -a "$ENVLOG"

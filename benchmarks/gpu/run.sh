#!/usr/bin/env bash
# The whole CUDA path in one prepared run (issue 15): the compiled Triton kernel's tests, the
# tiled loss against the full matrix and inf-cl, and a bf16 LoRA training step.
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]            # on the GPU machine (≤ 9 min on one H200)
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR    # the same script on a CPU, tiny shapes
#
# OUT_DIR defaults to $OUT. Before a GPU run: `bash benchmarks/gpu/wheels.sh` here, and carry
# benchmarks/gpu/wheels to the machine. Stages, in order, each under `timeout` (a hang loses only
# its own stage) and within a total budget (MMEMB_GPU_BUDGET_S, default 520 s):
#   env       device, driver and versions                          -> env.txt
#   install   the wheels the machine lacks, then mmemb (--no-deps)  -> env.txt
#   pytest    pytest -m gpu in 3 parallel shards (Triton compiles   -> pytest.log
#             on the CPU: shards use its cores)
#   loss      benchmarks/loss.py: tiled (Triton) vs full vs inf-cl, -> loss.log, loss_plain.json,
#             B = M in {16k, 64k, 256k}, D = 1024, bf16, plain/ega     loss_ega.json
#   train     benchmarks/gpu/train_step.py, ~0.6 B LLaVA-OneVision, -> train.log, train.jsonl
#             torch engine, then ZeRO-2 when deepspeed imports
#   summary   benchmarks/gpu/summary.py, printed last               -> summary.txt
# That is 8 files under OUT_DIR (the device tool returns at most 8). --dry-run uses the current
# environment (no install), CPU shapes, Triton's interpreter for the kernel, the tiny model, and
# skips what needs CUDA (inf-cl) or a first-time JIT build (DeepSpeed's CPU comm op) with a line
# that says so; tests/test_gpu_script.py runs it.
set -u -o pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
DRY=0
OUT_DIR=${OUT:-}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage 0 ;;
    -*) echo "run.sh: unknown option $arg" >&2; usage 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
[ -n "$OUT_DIR" ] || { echo "run.sh: give an output directory (or set OUT)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=${MMEMB_WHEELS:-$ROOT/benchmarks/gpu/wheels}
BUDGET=${MMEMB_GPU_BUDGET_S:-520}
PEAK=790  # H200 bf16 dense TFLOP/s
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
STAGES=()

# stage NAME CAP_S LOG CMD...: run CMD under `timeout`, capped by the budget left (15 s kept for
# the summary); append its output to LOG; record "ok", "failed (exit N)" or "timed out".
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  (( cap > left )) && cap=$left
  if (( cap < 5 )); then
    STAGES+=("$name=skipped: the ${BUDGET} s budget is spent"); echo "[$name] skipped: no time left"
    return 0
  fi
  echo "[$name] up to ${cap} s -> $(basename "$log")"
  printf '\n===== %s (cap %s s): %s\n' "$name" "$cap" "$*" >>"$log"
  local t0=$(date +%s) rc=0
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` needs a process
    timeout -k 10 "$cap" bash -c "$*" >>"$log" 2>&1 || rc=$?
  else
    timeout -k 10 "$cap" "$@" >>"$log" 2>&1 || rc=$?
  fi
  local took=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status="ok (${took} s)" ;;
    124|137) status="TIMED OUT after ${cap} s" ;;
    *) status="FAILED (exit $rc, ${took} s; see $(basename "$log"))" ;;
  esac
  STAGES+=("$name=$status"); echo "[$name] $status"
  return 0
}
skip() { STAGES+=("$1=skipped: $2"); echo "[$1] skipped: $2"; }

# --- env -----------------------------------------------------------------------------------------
env_info() {
  echo "## run.sh $([ $DRY = 1 ] && echo '--dry-run ')on $(hostname), $(date -u +%FT%TZ)"
  if command -v nvidia-smi >/dev/null; then
    echo "## GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  else
    echo "## GPU: none (nvidia-smi not found)"
  fi
  "$PY" - <<'EOF'
import platform
from importlib import metadata
# installed versions from metadata (importing deepspeed alone takes seconds)
print(f"## Python {platform.python_version()}", end="")
for dist in ("torch", "triton", "transformers", "peft", "pydantic", "webdataset", "deepspeed",
             "inf-cl", "mmemb"):
    try:
        print(f", {dist} {metadata.version(dist)}", end="")
    except metadata.PackageNotFoundError:
        print(f", {dist} missing", end="")
print()
import torch
if torch.cuda.is_available():
    print(f"## CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF
}

install_all() {
  [ -d "$WHEELS" ] || { echo "no $WHEELS: run benchmarks/gpu/wheels.sh and carry that folder"; return 1; }
  local bsp=() ok=0
  "$PY" -m pip install --help | grep -q -- --break-system-packages && bsp=(--break-system-packages)
  local pipi=("$PY" -m pip install --no-index --find-links "$WHEELS" "${bsp[@]}")
  # Groups apart, so a failure in one (say deepspeed) leaves the others installed.
  "${pipi[@]}" pydantic webdataset || ok=1
  "${pipi[@]}" inf-cl || echo "inf-cl not installed: the peer will be skipped"
  "${pipi[@]}" deepspeed || echo "deepspeed not installed: the ZeRO-2 step will be skipped"
  # mmemb itself over the machine's torch: no dependencies; setuptools/wheel come from $WHEELS
  # into pip's isolated build environment.
  "${pipi[@]}" --no-deps . || ok=1
  "$PY" -c "import mmemb, mmemb_tiled; from mmemb import plugins; print('mmemb', mmemb.__file__, 'losses:', plugins.available('loss'))" || ok=1
  return $ok
}

pytest_shards() {
  # Three processes compile Triton kernels in parallel (the compiles dominate this stage).
  local tmp; tmp=$(mktemp -d)
  local files=(tests/test_tiled_triton.py tests/test_duplicate_masking.py tests/test_eval_runner.py)
  if [ $DRY = 1 ]; then
    "$PY" -m pytest -m gpu -q -p no:cacheprovider "${files[@]}"; return $?
  fi
  "$PY" -m pytest -m gpu -v -p no:cacheprovider tests -k "float32" >"$tmp/1" 2>&1 & local p1=$!
  "$PY" -m pytest -m gpu -v -p no:cacheprovider tests -k "bfloat16" >"$tmp/2" 2>&1 & local p2=$!
  "$PY" -m pytest -m gpu -v -p no:cacheprovider tests -k "not float32 and not bfloat16" \
    >"$tmp/3" 2>&1 & local p3=$!
  local rc=0
  # pytest exits 5 when a shard selects nothing: not a failure
  wait $p1 || { r=$?; [ $r = 5 ] || rc=$r; }
  wait $p2 || { r=$?; [ $r = 5 ] || rc=$r; }
  wait $p3 || { r=$?; [ $r = 5 ] || rc=$r; }
  for i in 1 2 3; do echo "----- shard $i"; cat "$tmp/$i"; done
  rm -rf "$tmp"
  return $rc
}

# --- the run ------------------------------------------------------------------------------------
export -f env_info install_all pytest_shards
export PY DRY WHEELS
echo "run.sh: output in $OUT_DIR, budget ${BUDGET} s$([ $DRY = 1 ] && echo ', DRY RUN (CPU)')"
stage env 30 "$OUT_DIR/env.txt" env_info
if [ $DRY = 1 ]; then
  skip install "dry run uses the current environment"
else
  stage install 90 "$OUT_DIR/env.txt" install_all
  stage env-after 30 "$OUT_DIR/env.txt" env_info
fi

stage pytest 150 "$OUT_DIR/pytest.log" pytest_shards

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  LOSS=(--device cpu --dtype float32 --dim 32 --implementation triton --no-memory --threads 1
        --repeats 1 --inner 1 --peer)
  stage loss-plain 60 "$OUT_DIR/loss.log" "$PY" benchmarks/loss.py "${LOSS[@]}" --sizes 48 \
    --json "$OUT_DIR/loss_plain.json"
  stage loss-ega 60 "$OUT_DIR/loss.log" "$PY" benchmarks/loss.py "${LOSS[@]}" --sizes 48 \
    --full-max 32 --reweighter ega --json "$OUT_DIR/loss_ega.json"
  unset TRITON_INTERPRET
  stage train-torch 60 "$OUT_DIR/train.log" "$PY" benchmarks/gpu/train_step.py --size tiny \
    --device cpu --engine torch --batch 2 --steps 1 --warmup 1 --jsonl "$OUT_DIR/train.jsonl"
  skip train-zero2 "dry run: DeepSpeed's first CPU initialisation JIT-builds a comm op (~45 s)"
else
  LOSS=(--device cuda --dtype bfloat16 --dim 1024 --sizes 16384 65536 262144 --full-max 65536
        --repeats 1 --inner 3 --peer --peak-tflops $PEAK)
  stage loss-plain 120 "$OUT_DIR/loss.log" "$PY" benchmarks/loss.py "${LOSS[@]}" \
    --json "$OUT_DIR/loss_plain.json"
  stage loss-ega 100 "$OUT_DIR/loss.log" "$PY" benchmarks/loss.py "${LOSS[@]}" \
    --reweighter ega --json "$OUT_DIR/loss_ega.json"
  stage train-torch 80 "$OUT_DIR/train.log" "$PY" benchmarks/gpu/train_step.py --size 0.5b \
    --engine torch --jsonl "$OUT_DIR/train.jsonl"
  if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    stage train-zero2 80 "$OUT_DIR/train.log" "$PY" benchmarks/gpu/train_step.py --size 0.5b \
      --engine zero2 --jsonl "$OUT_DIR/train.jsonl"
  else
    skip train-zero2 "deepspeed does not import (not among the carried wheels?)"
  fi
fi

SUMMARY_ARGS=()
for s in "${STAGES[@]}"; do SUMMARY_ARGS+=(--stage "$s"); done
echo
"$PY" benchmarks/gpu/summary.py "$OUT_DIR" --peak-tflops $PEAK "${SUMMARY_ARGS[@]}" \
  || echo "summary failed; stages: ${STAGES[*]}"
echo "run.sh: $(( $(date +%s) - START )) s in all"

#!/usr/bin/env bash
# One prepared GPU check for geoclip (issue 4): environment, CUDA training smoke (+ `pytest -m gpu` if any such
# tests exist), then the training-throughput bench (resnet18/resnet50, 64 px, 13 bands, bf16, channels_last,
# batch 256..4096, torch.compile off/on, resnet18 with reduce-overhead). Results go to $OUT/gpu_check.tar.gz (+ the log); every step runs under `timeout` and the step
# limits add up to 540 s, so one device call with timeout_s=600 covers it.
#
#   bash bench/gpu_check.sh                  # on the device, in the repo root ($OUT set by the device tool)
#   bash bench/gpu_check.sh --dry-run        # anywhere (CPU too): check the imports and the bench's CLI only
#   bash bench/gpu_check.sh --fetch-wheels   # here, where pip can reach the registry: wheels into $WHEELS
#
# The device has its own PyTorch and no network: the missing pure-Python packages (timm) are installed
# with --no-deps from $WHEELS (default .whl/, git-ignored; pass it to the device call's `carry`).
# Limits (seconds) can be overridden from the environment: T_ENV T_TESTS T_SMOKE T_EAGER18 T_EAGER50 T_COMP18 T_COMP50.
set -uo pipefail

cd "$(dirname "$0")/.."
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run|--fetch-wheels]" >&2; exit 2 ;;
esac
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-$PWD/gpu_out}
# The device tool returns at most 8 files: every step writes into RES, packed into one tarball at the end.
RES=$(mktemp -d)
WHEELS=${WHEELS:-.whl}
BATCHES=${BATCHES:-256 512 1024 2048 4096}
COMPILE_BATCHES=${COMPILE_BATCHES:-1024 4096 256}  # torch.compile costs ~1 min per shape: the most telling first
FAILED=()

log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$RES/gpu_check.log"; }
pack() { tar czf "$OUT/gpu_check.tar.gz" -C "$RES" . && cp "$RES/gpu_check.log" "$OUT/" 2>/dev/null; }
lock_version() { grep -i "^$1==" requirements.lock | head -1 | cut -d= -f3; }

# step NAME SECONDS CMD...: run CMD under timeout, output to $RES/NAME.txt, remember failures, go on.
step() {
  local name=$1 limit=$2
  shift 2
  log "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$RES/$name.txt") 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || { FAILED+=("$name(rc=$rc)"); log "$name failed: rc=$rc (124 = timed out)"; }
  return 0
}

if [ "$MODE" = fetch ]; then
  mkdir -p "$WHEELS"
  # The device runs CPython 3.12 on x86-64: fetch wheels for that platform, whatever this machine is.
  # rasterio (+ its small pure-Python needs) is for bench/score_throughput.py; the device has the rest.
  plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
  pkgs=()
  for pkg in timm rasterio affine cligj click-plugins; do pkgs+=("$pkg==$(lock_version "$pkg")"); done
  "$PY" -m pip download --no-deps --only-binary=:all: "${plat[@]}" -d "$WHEELS" "${pkgs[@]}" || exit 1
  ls -l "$WHEELS"
  exit 0
fi

mkdir -p "$OUT"
trap pack EXIT

# 1. Environment: the device's own torch; CUDA must be there unless this is a dry run.
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())" | tee "$RES/env.txt" || {
  log "no importable torch in $PY"; exit 3; }
command -v nvidia-smi >/dev/null && nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$MODE" = run ] && [ "$CUDA" != 1 ]; then log "torch sees no CUDA device; nothing to measure"; exit 3; fi

# 2. Only what the bench and the smoke need beyond torch: torchvision (timm imports it), timm, numpy.
for pkg in torchvision timm numpy; do
  "$PY" -c "import $pkg" 2>/dev/null && continue
  ver=$(lock_version "$pkg")
  if [ "$pkg" = torchvision ] && ! "$PY" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$(lock_version torch)')"; then
    log "torchvision missing and torch differs from the lock's $(lock_version torch): install a matching torchvision"
    FAILED+=("torchvision"); continue
  fi
  if [ "$MODE" = dry ]; then log "missing $pkg==$ver (a real run installs it)"; FAILED+=("$pkg"); continue; fi
  if [ -d "$WHEELS" ]; then
    step "pip_$pkg" "${T_ENV:-60}" "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" "$pkg==$ver"
  else
    step "pip_$pkg" "${T_ENV:-60}" "$PY" -m pip install --no-deps "$pkg==$ver"
  fi
done

# 3. Imports: everything the bench and the smoke load (geoclip comes from this checkout, not site-packages).
step imports 60 "$PY" bench/train_throughput.py --help
if [ "$MODE" = dry ]; then
  log "dry run done; failed: ${FAILED[*]:-none}"
  [ ${#FAILED[@]} -eq 0 ]; exit $?
fi
"$PY" -c "import torch; print(torch.cuda.get_device_name())" | tee -a "$RES/env.txt"

# 4. CUDA tests: `pytest -m gpu` when such tests exist and pytest imports; always the training smoke
#    (resnet18 GeoCLIP, bf16 autocast + channels_last, int32 data kept on the GPU, augmentation there).
if grep -rqs "mark.gpu" tests/ && "$PY" -c "import pytest" 2>/dev/null; then
  step pytest_gpu "${T_TESTS:-90}" "$PY" -m pytest -m gpu -q tests
fi
step smoke "${T_SMOKE:-60}" "$PY" bench/train_throughput.py --smoke --out "$RES/smoke.json"

# 5. Throughput: eager at every batch size, then compiled at COMPILE_BATCHES; one JSON per call, rows written
#    as they finish, so a timeout still leaves the rows measured before it.
step eager_resnet18 "${T_EAGER18:-90}" "$PY" bench/train_throughput.py --models resnet18 --batch-sizes $BATCHES \
  --compile off --out "$RES/throughput_resnet18_eager.json"
step eager_resnet50 "${T_EAGER50:-120}" "$PY" bench/train_throughput.py --models resnet50 --batch-sizes $BATCHES \
  --compile off --out "$RES/throughput_resnet50_eager.json"
step compile_resnet18 "${T_COMP18:-100}" "$PY" bench/train_throughput.py --models resnet18 \
  --batch-sizes $COMPILE_BATCHES --compile on --out "$RES/throughput_resnet18_compile.json"
# train.compile: reduce-overhead (CUDA graphs): the launch-bound small batches are where it should help most.
step compile_ro_resnet18 "${T_COMPRO:-100}" "$PY" bench/train_throughput.py --models resnet18 \
  --batch-sizes $COMPILE_BATCHES --compile reduce-overhead --out "$RES/throughput_resnet18_reduce_overhead.json"
step compile_resnet50 "${T_COMP50:-120}" "$PY" bench/train_throughput.py --models resnet50 \
  --batch-sizes $COMPILE_BATCHES --compile on --out "$RES/throughput_resnet50_compile.json"

log "done; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]

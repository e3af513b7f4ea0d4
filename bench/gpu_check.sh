#!/usr/bin/env bash
# One prepared GPU check for geoclip (issue 4): environment, the CUDA tests (`pytest -m gpu`, counts in
# pytest_gpu.json), the CUDA training smoke, then the training-throughput bench (resnet18/resnet50, 64 px, 13
# bands, bf16, channels_last, batch 256..4096, torch.compile off/on, resnet18 with reduce-overhead). Results go to
# $OUT/gpu_check.tar.gz (+ the log); every step runs under `timeout`. The default limits add up to 800 s, more than
# one 600 s device call: most steps end well before theirs, but lower T_* (or COMPILE_BATCHES) when they might not,
# as the tarball is packed only when the script exits.
#
#   bash bench/gpu_check.sh                  # on the device, in the repo root ($OUT set by the device tool)
#   bash bench/gpu_check.sh --dry-run        # anywhere (CPU too): check the imports and the bench's CLI only
#   bash bench/gpu_check.sh --fetch-wheels   # here, where pip can reach the registry: wheels into $WHEELS
#
# The device has its own PyTorch and no network: the missing pure-Python packages (timm) are installed
# with --no-deps from $WHEELS (default .whl/, git-ignored; pass it to the device call's `carry`); so is pytest
# (with pluggy, iniconfig, packaging) for the gpu-marked tests.
# Limits (seconds) can be overridden from the environment: T_ENV T_TESTS T_SMOKE T_EAGER18 T_EAGER50 T_COMP18 T_COMPRO
# T_COMP50.
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
  for pkg in timm rasterio affine cligj click-plugins pytest pluggy iniconfig packaging; do
    pkgs+=("$pkg==$(lock_version "$pkg")")
  done
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

# 2. Only what the bench, the smoke and the gpu tests need beyond torch: torchvision (timm imports it), timm, numpy,
#    pytest (its dependencies first: `import pytest` fails without them).
for pkg in torchvision timm numpy pluggy iniconfig packaging pytest; do
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

# 3. Imports: everything the bench and the smoke load (geoclip comes from this checkout, not site-packages), and
#    the gpu tests' modules. Only the files with gpu-marked tests are collected: the rest of tests/ imports MLflow,
#    rasterio and pandas, which the device lacks, and one collection error stops pytest before any test runs.
step imports 60 "$PY" bench/train_throughput.py --help
GPU_TESTS=$(grep -rl --include='test_*.py' "mark\.gpu" tests/ | sort | tr '\n' ' ')
if [ -n "$GPU_TESTS" ]; then
  step collect_gpu_tests 60 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider $GPU_TESTS
fi
if [ "$MODE" = dry ]; then
  log "dry run done; failed: ${FAILED[*]:-none}"
  [ ${#FAILED[@]} -eq 0 ]; exit $?
fi
"$PY" -c "import torch; print(torch.cuda.get_device_name())" | tee -a "$RES/env.txt"

# 4. CUDA tests: `pytest -m gpu` on the gpu-marked files (counts into pytest_gpu.json and the log: on a GPU, none
#    passing means the check verified nothing, a failure too); then the training smoke (resnet18 GeoCLIP, bf16
#    autocast + channels_last, int32 data kept on the GPU, augmentation there).
gpu_test_counts() {  # pytest's JUnit XML -> pytest_gpu.json; prints "tests passed failed errors skipped"
  "$PY" - "$RES/pytest_gpu.xml" "$RES/pytest_gpu.json" <<'PYEOF'
import json, sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "report": "none (pytest killed?)"}
else:
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts = {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
              "skipped": counts["skipped"]}
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
json.dump(counts, open(sys.argv[2], "w"), indent=2)
print(counts["tests"], counts["passed"], counts["failed"], counts["errors"], counts["skipped"])
PYEOF
}
if [ -z "$GPU_TESTS" ]; then
  log "no test is marked gpu"; FAILED+=("pytest_gpu(none marked)")
elif ! "$PY" -c "import pytest" 2>/dev/null; then
  log "pytest does not import: the gpu tests did not run"; FAILED+=("pytest_gpu(no pytest)")
else
  step pytest_gpu "${T_TESTS:-90}" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider \
    --junitxml="$RES/pytest_gpu.xml" $GPU_TESTS
  read -r n_tests n_passed n_failed n_errors n_skipped < <(gpu_test_counts)
  log "pytest -m gpu: ${n_tests:-0} collected, ${n_passed:-0} passed, ${n_failed:-0} failed, ${n_errors:-0} errors," \
      "${n_skipped:-0} skipped (reasons in pytest_gpu.txt)"
  [ "${n_passed:-0}" -gt 0 ] || FAILED+=("pytest_gpu(none passed)")
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

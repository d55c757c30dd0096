#!/usr/bin/env bash
# Every GPU test (pytest -m gpu), one file per process so that each file has its own time limit (the autotuners compile every
# candidate on first use: the atomic file alone takes ~150 s on an H100) and writes its log and JUnit XML to $OUT.
# PARALLEL=1 runs the files side by side: they are bound by Triton compiles on the CPU, not by the GPU.
#
#   OUT=outputs/gpu_tests [PARALLEL=1] scripts/gpu_tests.sh [LIMIT_S]      # exit status: how many files failed
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0; fi
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_tests}
PY=${PYTHON:-python3}
LIMIT=${1:-300}
FILES="tests/attention/test_triton_gpu.py tests/attention/test_triton_atomic_dq_gpu.py tests/attention/test_fp8_gpu.py
       tests/attention/test_gluon_gpu.py tests/attention/test_gluon_bwd_gpu.py
       tests/attention/test_sdpa_backend.py tests/trainer/test_optim.py tests/trainer/test_loss.py"
mkdir -p "$OUT"

run_one() {  # file -> its log, XML and exit status under $OUT
  local name
  name=$(basename "$1" .py)
  timeout "$LIMIT" "$PY" -m pytest -q -m gpu "$1" --junitxml="$OUT/$name.xml" >"$OUT/$name.log" 2>&1
  echo $? >"$OUT/$name.rc"
}

for f in $FILES; do
  if [ "${PARALLEL:-0}" = 1 ]; then run_one "$f" & else run_one "$f"; fi
done
wait
failed=0
for f in $FILES; do
  name=$(basename "$f" .py)
  rc=$(cat "$OUT/$name.rc")
  echo "$name: $(tail -1 "$OUT/$name.log") (exit $rc)"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
done
exit "$failed"

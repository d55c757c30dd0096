#!/usr/bin/env bash
# Every GPU test (pytest -m gpu), one file per process: the CPU test files set TRITON_INTERPRET=1 at import, so a
# GPU file must not share a process with them. Each file has its own time limit (the autotuners compile every
# candidate on first use: the atomic file alone takes ~150 s on an H100) and writes its log and JUnit XML to $OUT.
#
#   OUT=outputs/gpu_tests scripts/gpu_tests.sh [LIMIT_S]      # exit status: how many files failed
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_tests}
PY=${PYTHON:-python3}
LIMIT=${1:-300}
mkdir -p "$OUT"
failed=0
for f in tests/test_triton_gpu.py tests/test_triton_atomic_dq_gpu.py tests/test_fp8_gpu.py tests/test_sdpa_backend.py \
         tests/test_loss.py; do
  name=$(basename "$f" .py)
  timeout "$LIMIT" "$PY" -m pytest -q -m gpu "$f" --junitxml="$OUT/$name.xml" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: $(tail -1 "$OUT/$name.log") (exit $rc)"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
done
exit "$failed"

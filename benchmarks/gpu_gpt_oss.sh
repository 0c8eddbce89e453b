#!/usr/bin/env bash
# On a lent GPU in one call (under 10 minutes): gpt_oss's CUDA tests (biased clamped-SwiGLU experts in the fused
# kernels and the captured step), then `fate bench` at gpt-oss-20b's shape at 8 and 12 GB and gpt-oss-120b's at
# 8 GB with every policy, all rows in $OUT.
#   FATE_HOME=$PWD/.carry/home bash benchmarks/gpu_gpt_oss.sh
# (TESTS=0 skips the tests; BENCH_ARGS replaces "-p 128 -n 32 -r 1")
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import typer, rich" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl typer rich
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [[ ${TESTS:-1} == 1 ]]; then
  timeout "${LIMIT_TESTS:-150}" python3 -m pytest -q tests/test_gpt_oss_cuda.py \
    tests/test_gpt_oss.py::test_cuda_greedy_matches_through_the_captured_step 2>&1 | tail -30 | tee "$OUT/tests.log"
fi
POLICIES=resident,fate,lru,eap,fmoe,klotski,ondemand
ARGS=${BENCH_ARGS:--p 128 -n 32 -r 1}
timeout "${LIMIT_20B:-240}" python3 -m fate_cli bench synthetic:gpt-oss-20b --vram 8GB,12GB --policy $POLICIES $ARGS \
  --rows-to "$OUT/rows.jsonl" -q 2>"$OUT/bench-20b.err" | tee "$OUT/bench-20b.md"
echo "20b exit ${PIPESTATUS[0]}"; tail -3 "$OUT/bench-20b.err"
timeout "${LIMIT_120B:-200}" python3 -m fate_cli bench synthetic:gpt-oss-120b --vram 8GB --policy $POLICIES $ARGS \
  --rows-to "$OUT/rows.jsonl" -q 2>"$OUT/bench-120b.err" | tee "$OUT/bench-120b.md"
echo "120b exit ${PIPESTATUS[0]}"; tail -3 "$OUT/bench-120b.err"

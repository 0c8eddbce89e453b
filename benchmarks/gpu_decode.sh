#!/usr/bin/env bash
# On a lent GPU in one call: the captured decode step's GPU tests, then benchmarks/bench_decode.py.
#   FATE_HOME=$PWD/.carry/home SHAPES=olmoe-1b-7b,qwen3-30b-a3b bash benchmarks/gpu_decode.sh
# (TESTS=0 skips the tests, BENCH=0 the benchmark; BENCH_ARGS adds arguments to the benchmark; results in $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import typer, rich" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl typer rich
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
if [[ ${TESTS:-1} == 1 ]]; then
  timeout "${LIMIT_TESTS:-240}" python3 -m pytest -x -q tests/test_decode_step_cuda.py 2>&1 | tail -30 | tee "$OUT/tests.log"
fi
[[ ${BENCH:-1} == 1 ]] || exit 0
timeout "${LIMIT_BENCH:-330}" python3 benchmarks/bench_decode.py --shapes "${SHAPES:-olmoe-1b-7b}" --out "$OUT/decode.jsonl" \
  ${BENCH_ARGS:-} 2>"$OUT/bench.err" | cut -c1-400
echo "bench exit ${PIPESTATUS[0]}"; tail -5 "$OUT/bench.err"

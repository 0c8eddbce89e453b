#!/usr/bin/env bash
# The offload benchmark on a lent GPU, all in one run: every policy at 25/50/75% of the hot-tier expert
# bytes, a 512-token prompt then new tokens, on (b) replay:mixtral-8x7b, (c) synthetic:mixtral-8x7b and
# (a) the bundled model, plus a token-identity check with --transfer-bits 4. Each part writes its own
# files to $OUT (JSON rows, markdown table, PNG plot, log), so a part that runs out of time loses only itself.
#
#   FATE_HOME=.carry/home bash benchmarks/gpu_bench.sh      (N=new tokens, R=repetitions; defaults 64 and 1)
#   PARTS="replay bundled" ... runs only those parts (one lent-machine call has 10 minutes);
#   LIMIT_<part>=SECONDS overrides a part's time limit, N_<part> and R_<part> its lengths,
#   VRAM_<part> its budgets and POLICY_<part> its policies (default: all).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/gpu_bench; rm -rf "$W"; mkdir -p "$W"   # the results, packed into $OUT/gpu_bench.tgz at the end
N=${N:-64}; R=${R:-1}
python3 -c "import typer, rich" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl typer rich
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$W/device.txt"

PARTS=${PARTS:-replay synthetic qwen3 bundled batch_bundled batch_replay identity}
part() {  # part NAME SECONDS ARGS...  (skipped unless NAME is in PARTS)
  local name=$1 limit=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  local var=LIMIT_$name; limit=${!var:-$limit}
  echo "== $name: fate bench $* (limit $limit s)" | tee -a "$W/device.txt"
  local start=$SECONDS
  local plot=(); python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$W/$name.png")
  timeout "$limit" python3 -m fate_cli bench "$@" -q -o md "${plot[@]}" --rows-to "$W/$name.jsonl" \
    >"$W/$name.md" 2>"$W/$name.log"
  echo "   exit $? after $((SECONDS - start)) s" | tee -a "$W/device.txt"
  tail -3 "$W/$name.log"
}
n() { local var=N_$1; echo "${!var:-$N}"; }
r() { local var=R_$1; echo "${!var:-$R}"; }
v() { local var=VRAM_$1; echo "${!var:-25%,50%,75%}"; }
p() { local var=POLICY_$1; echo "--policy ${!var:-resident,fate,lru,eap,fmoe,ondemand}"; }

part replay 150 replay:mixtral-8x7b --vram "$(v replay)" $(p replay) -p 512 -n "$(n replay)" -r "$(r replay)"
part synthetic 150 synthetic:mixtral-8x7b --vram "$(v synthetic)" $(p synthetic) -p 512 -n "$(n synthetic)" -r "$(r synthetic)"
part qwen3 150 synthetic:qwen3-30b-a3b --vram "$(v qwen3)" $(p qwen3) -p 512 -n "$(n qwen3)" -r "$(r qwen3)"
part bundled 100 tiny --vram "$(v bundled)" $(p bundled) -p 512 -n "$(n bundled)" -r "$(r bundled)"
part batch_bundled 150 tiny --vram 50% $(p batch_bundled) --batch 1,4,16 -p 512 -n "$(n batch_bundled)" -r 1
part batch_replay 300 replay:mixtral-8x7b --vram 50% $(p batch_replay) --batch 1,4,16 -p 512 -n "$(n batch_replay)" -r 1
part batch_replay_t4 120 replay:mixtral-8x7b --vram 50% $(p batch_replay_t4) --batch "${BATCH_batch_replay_t4:-16}" \
  --transfer-bits 4 -p 512 -n "$(n batch_replay_t4)" -r 1
part identity 50 tiny --vram 25%,50% --transfer-bits 4 --dtype float32 -p 256 -n 32 -r 1
tar czf "$OUT/gpu_bench.tgz" -C /tmp gpu_bench && cat "$W/device.txt"

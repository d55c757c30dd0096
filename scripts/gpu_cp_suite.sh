#!/usr/bin/env bash
# Multi-GPU context-parallel suite (one host, NCCL): the runs behind README's multi-GPU tables.
#
#   OUT=outputs/gpu_cp scripts/gpu_cp_suite.sh           # every visible GPU (2 or more)
#
# 1. correctness: ring / Ulysses (/ hybrid on 4+) vs single-GPU attention (check_cp_gpu.py) on 2 and all GPUs
# 2. trainer loss curves: cp=1, cp=2, cp=all GPUs, 50 steps of llama_220m at 16K on the same data
# 3. attention scaling: scripts/bench_cp.py at 128K..1M tokens on all GPUs (ring, no-overlap ring, Ulysses,
#    hybrid, and torch's context_parallel as the anchor); 3b. ring and Ulysses on torch's kernels (cuDNN)
# 4. trainer throughput: llama_220m (vocab 32000), cp=all GPUs, 256K and 512K tokens of whole-sequence attention
# Each part has its own time limit and writes into $OUT as it goes, so a cut-short run keeps what it did.
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0; fi
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_cp}
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
# NVLink multicast can take a shared host's GPUs out of service: keep it off in every process
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"/logs
TR=("$PY" -m torch.distributed.run --standalone)

train() {  # train <name> <nproc> <timeout s> <overrides...>: metrics.jsonl -> $OUT/train_<name>.jsonl
  local name=$1 nproc=$2 limit=$3
  shift 3
  timeout "$limit" "${TR[@]}" --nproc_per_node="$nproc" -m trainer.train model=llama_220m data.batch_size=1 \
    model.compile=false train.eval_every=0 train.eval_batches=1 train.ckpt_every=0 train.log_every=1 \
    optim.lr=6e-4 optim.warmup_steps=10 run_name="$name" train.out_dir=/tmp/ringflash_runs/"$name" "$@" \
    >"$OUT/logs/train_$name.log" 2>&1
  echo "train $name: exit $?"
  cp /tmp/ringflash_runs/"$name"/metrics.jsonl "$OUT/train_$name.jsonl" 2>/dev/null
}

echo "== 1. correctness"
for W in 2 "$NGPU"; do
  timeout 150 "${TR[@]}" --nproc_per_node="$W" scripts/check_cp_gpu.py --seq-lens 16384,65536 \
    --out "$OUT" >"$OUT/logs/check_w$W.log" 2>&1
  echo "check_cp_gpu W=$W: exit $?"
  tail -n 14 "$OUT/logs/check_w$W.log"
  [[ "$NGPU" -eq 2 ]] && break
done

echo "== 2. loss curves (cp=1 and cp=2 side by side, then cp=$NGPU)"
CURVE=(data.seq_len=16384 train.steps=50 model.ckpt=selective)
CUDA_VISIBLE_DEVICES=0 train curve_cp1 1 240 "${CURVE[@]}" parallel.cp=1 &
if [[ "$NGPU" -ge 3 ]]; then
  CUDA_VISIBLE_DEVICES=1,2 train curve_cp2 2 240 "${CURVE[@]}" parallel=ring parallel.cp=2 &
  wait
  train "curve_cp$NGPU" "$NGPU" 240 "${CURVE[@]}" parallel=ring parallel.cp="$NGPU"
else
  wait
  train curve_cp2 2 240 "${CURVE[@]}" parallel=ring parallel.cp=2
fi

echo "== 3. attention scaling"
timeout 200 "${TR[@]}" --nproc_per_node="$NGPU" scripts/bench_cp.py --seq-lens 131072,262144,524288,1048576 \
  --heads 8 --kv-heads 8 --layouts zigzag --impls local,full,ring,ring-noovl,ulysses,hybrid,torch-cp \
  --warmup 1 --iters 3 \
  --json "$OUT/bench_cp_w$NGPU.json" >"$OUT/logs/bench_cp_w$NGPU.log" 2>&1
echo "bench_cp W=$NGPU: exit $?"
tail -n 22 "$OUT/logs/bench_cp_w$NGPU.log"

echo "== 3b. the same on torch's kernels (backend=sdpa: cuDNN per block on sm90+), against torch's context_parallel"
timeout 150 "${TR[@]}" --nproc_per_node="$NGPU" scripts/bench_cp.py --seq-lens 131072,524288 \
  --heads 8 --kv-heads 8 --layouts zigzag --impls local,ring,ulysses,torch-cp --backend sdpa \
  --warmup 1 --iters 3 \
  --json "$OUT/bench_cp_sdpa_w$NGPU.json" >"$OUT/logs/bench_cp_sdpa_w$NGPU.log" 2>&1
echo "bench_cp sdpa W=$NGPU: exit $?"
tail -n 10 "$OUT/logs/bench_cp_sdpa_w$NGPU.log"

echo "== 4. trainer throughput"
LONG=(model.vocab_size=32000 model.ckpt=selective data.cross_doc_attention=true parallel=ring parallel.cp="$NGPU")
train "tput_256k_cp$NGPU" "$NGPU" 120 "${LONG[@]}" data.seq_len=262144 train.steps=5
train "tput_512k_cp$NGPU" "$NGPU" 150 "${LONG[@]}" data.seq_len=524288 train.steps=3
for f in "$OUT"/train_*.jsonl; do echo "$f"; tail -n 2 "$f"; done

#!/usr/bin/env bash
# torchrun wrapper for single- and multi-node training; every argument is passed to Hydra.
#
#   scripts/launch.sh model=llama_220m data.seq_len=65536              # all GPUs of this node
#   NPROC_PER_NODE=2 scripts/launch.sh train.device=cpu parallel.dp=2   # 2 CPU processes (gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 scripts/launch.sh parallel.dp=16   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 scripts/launch.sh parallel.dp=16   # on node1
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# NPROC_PER_NODE (number of visible GPUs, else 1), PYTHON (.venv/bin/python if present, else python3),
# RDZV_ID (a job id shared by all nodes; default ringflash). Every rank uses the same train.out_dir.
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0; fi
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

if [[ "$NNODES" -eq 1 ]]; then
  # One node: a private rendezvous on localhost, no shared store needed.
  RDZV=(--standalone)
else
  RDZV=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_backend=c10d
        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-ringflash}")
fi

# torchrun sets OMP_NUM_THREADS=1 per process when it starts several; keep a user's explicit value.
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  -m trainer.train "$@"

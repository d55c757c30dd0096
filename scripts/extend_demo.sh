#!/usr/bin/env bash
# Context extension end to end on one GPU, with no hub: pretrain a llama_220m-shaped model at PRE tokens (byte
# tokenizer, stdlib corpus, half synthetic passkey documents), export it as a Hugging Face directory, load it back
# with model=hf and extend it to EXT tokens twice (YaRN, and a raised rope_theta), then measure perplexity by
# position and passkey retrieval before and after. Results (JSON + PNG) and logs go to $R.
#
#   R=outputs/extend_demo scripts/extend_demo.sh                # GPU: about 5 minutes on one H200
#   PY=.venv/bin/python R=/tmp/x MODEL=tiny PRE=128 EXT=256 PB=4 PSTEPS=20 ESTEPS=4 DEV=cpu LENS=[128,256] \
#     SAMPLES=1 DOCS=2 scripts/extend_demo.sh                   # CPU smoke run
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p;}' "$0"; exit 0; fi
set -u
PY=${PY:-python}; R=${R:-outputs/extend_demo}; O=$R/runs; mkdir -p "$O"
MODEL=${MODEL:-llama_220m}; PRE=${PRE:-2048}; EXT=${EXT:-32768}; PB=${PB:-16}; PSTEPS=${PSTEPS:-800}
ESTEPS=${ESTEPS:-100}; FACTOR=$((EXT / PRE)); DEV=${DEV:-cuda}; THETA=${THETA:-500000}
LENS=${LENS:-[2048,8192,16384,32768]}; SAMPLES=${SAMPLES:-4}; DOCS=${DOCS:-8}
common="train.device=$DEV train.ckpt_every=${CKEVERY:-400} train.eval_every=0 train.log_every=20 data.passkey_ratio=0.5"
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "pretrain $MODEL at $PRE tokens"
$PY -m trainer.train model="$MODEL" data.seq_len="$PRE" data.batch_size="$PB" data.passkey_max_len="$PRE" \
  train.steps="$PSTEPS" optim.lr=3e-4 optim.min_lr=3e-4 optim.warmup_steps=50 run_name=pre train.out_dir="$O/pre" \
  $common > "$R/pre.log" 2>&1 || { tail -20 "$R/pre.log"; exit 1; }
stamp export
$PY -m trainer.export "$O/pre" --out "$O/hf_pre" > "$R/export.log" 2>&1 || { tail -20 "$R/export.log"; exit 1; }

extend() {  # name overrides...: continued pretraining of the exported model at EXT tokens
  local name=$1; shift
  $PY -m trainer.train model=hf model.path="$O/hf_pre" data.seq_len="$EXT" data.batch_size=1 \
    data.passkey_max_len="$EXT" train.steps="$ESTEPS" optim.lr=1e-4 optim.min_lr=1e-4 optim.warmup_steps=10 \
    model.ckpt=selective run_name="$name" train.out_dir="$O/$name" $common "$@" > "$R/$name.log" 2>&1 \
    || tail -20 "$R/$name.log"
}
evaluate() {  # name checkpoint overrides...: perplexity by position and passkey retrieval at EXT tokens
  local name=$1 ckpt=$2; shift 2
  $PY -m trainer.eval_ppl checkpoint="$ckpt" seq_len="$EXT" docs="$DOCS" out="$R/ppl_$name" progress=false "$@" \
    > "$R/ppl_$name.log" 2>&1 || tail -5 "$R/ppl_$name.log"
  $PY -m trainer.eval_passkey checkpoint="$ckpt" lengths="$LENS" 'depths=[0.0,0.5,1.0]' samples="$SAMPLES" \
    batch_size=1 out="$R/passkey_$name" "$@" > "$R/passkey_$name.log" 2>&1 || tail -5 "$R/passkey_$name.log"
}
yarn="model.rope_scaling.type=yarn model.rope_scaling.factor=$FACTOR model.rope_scaling.original_max_position_embeddings=$PRE"

stamp "extend to $EXT tokens (YaRN x$FACTOR; rope_theta x$FACTOR), evaluate the pretrained model"
extend ext_yarn $yarn &
extend ext_theta model.rope_theta=$((THETA * FACTOR)) &
evaluate pre "$O/pre" &
evaluate pre_yarn_untrained "$O/pre" $yarn &
wait
stamp "evaluate the extended models"
evaluate ext_yarn "$O/ext_yarn" &
evaluate ext_theta "$O/ext_theta" &
wait
stamp done
grep -h "passkey step" "$R"/passkey_*.log

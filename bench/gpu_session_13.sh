#!/usr/bin/env bash
# Issue 13 on one H200, two parts of one device call each (<= ~9 minutes):
#   bench/gpu_session_13.sh compare   titanlite then torchtitan for each setting, 7B shape with 8 layers,
#                                     micro-batch 4 x 4096, compile, 20 steps logged every 5:
#                                     bf16 selective AC (A = 1), float8 tensorwise selective AC (A = 1),
#                                     bf16 no AC (A = 4)
#   bench/gpu_session_13.sh memory    300 steps bf16 vs float8 on the 7B shape with 4 layers, same data (curves and
#                                     the mean of the last 50 losses under $OUT/loss_curves); adamw vs adamw8bit
#                                     (7B, 8 layers, selective AC); start-up and training peak of the 13B shape
#                                     with 4 layers
#   bench/gpu_session_13.sh extras    (optional) CPU-offloaded AdamW, the GPU-only tests of issue 13, the
#                                     head + loss micro-benchmark (bench/bench_head_loss.py)
# Results: one JSON line per case in $OUT/cases.jsonl (bench/gpu_case.sh), logs in $OUT/logs.
# torchtitan runs only where .tt/ exists and torchtitan imports (.whl/ installed), else a skip line.
# torchtitan's selective AC is per op here (TT_SAC=op), as titanlite's; its float8 leaves the output head in
# bf16 (TT_FLOAT8_FILTER=output), as titanlite's: the same linears in float8 on both sides.
# DRY=1: every titanlite case on the CPU at a tiny shape, 2 steps (float8 emulated): checks the script only.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
part=${1:-compare}
TT_SAC=${TT_SAC:-op}
TT_FLOAT8_FILTER=${TT_FLOAT8_FILTER:-output}
if [[ -n ${DRY:-} ]]; then
  tiny() { echo --model.dim 64 --model.n_heads 4 --model.n_kv_heads 2 --model.intermediate_size 128 \
    --model.vocab_size 2048 --model.n_layers "$1" --training.seq_len 64 --training.device cpu \
    --training.mixed_precision fp32 --data.default_num_documents 300; }
  shape7() { tiny "$1"; }
  shape13() { tiny "$1"; }
  SEQ=64 STEPS=2 LOSS_STEPS=4 COMPILE=false FLOAT8="--float8.enable true --float8.emulate true" SLACK=6
else
  shape7() { seven_b "$1"; }
  shape13() { thirteen_b "$1"; }
  SEQ=4096 STEPS=20 LOSS_STEPS=300 COMPILE=true FLOAT8="--float8.enable true" SLACK=1
fi
# micro-batch, steps, grad-accum A, log every: the rest of a titanlite case (warmup 5 steps, LR 3e-4)
run_args() { local tokens=$(( $1 * SEQ * $3 ))
  echo --training.micro_batch_size "$1" --training.global_batch_tokens "$tokens" --training.steps "$2" \
    --metrics.log_freq "${4:-5}" --lr_schedule.warmup_tokens $(( 5 * tokens )) --optimizer.lr 3e-4 \
    --compile.enable "$COMPILE"; }
titanlite() { local limit=$1 name=$2; shift 2; timeout $(( limit * SLACK )) bench/gpu_case.sh titanlite "$name" 1 "$@"; }
torchtitan() { local limit=$1 name=$2; shift 2
  if [[ -d .tt ]] && python3 -c "import torchtitan" 2>/dev/null; then
    timeout "$limit" bench/gpu_case.sh torchtitan "$name" 1 $(tt_seven_b 8) --training.local_batch_size 4 \
      --training.steps "$STEPS" --metrics.log_freq 5 --compile.enable "$@"
  else
    echo "{\"framework\": \"torchtitan\", \"name\": \"$name\", \"skipped\": \"no .tt/ or torchtitan\"}" \
      | tee -a "$OUT/cases.jsonl"
  fi; }
SAC="--activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0"
TT_SAC_ARGS="--activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option $TT_SAC"
TT_FLOAT8="--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise --quantize.linear.float8.filter_fqns $TT_FLOAT8_FILTER"

case $part in
compare)
  titanlite 95 7b_l8_sac $(shape7 8) $(run_args 4 "$STEPS" 1) $SAC
  torchtitan 95 7b_l8_sac $TT_SAC_ARGS
  titanlite 95 7b_l8_sac_float8 $(shape7 8) $(run_args 4 "$STEPS" 1) $SAC $FLOAT8
  torchtitan 95 7b_l8_sac_float8 $TT_SAC_ARGS $TT_FLOAT8
  titanlite 110 7b_l8_noac_a4 $(shape7 8) $(run_args 4 "$STEPS" 4)
  torchtitan 110 7b_l8_noac_a4 --activation_checkpoint.mode none --training.global_batch_size 16
  ;;
memory)
  # Same seed, same data order, same schedule: only the matmul precision differs.
  loss=(--training.seed 0 --metrics.log_freq 1 --lr_schedule.decay cosine)
  titanlite 170 7b_l4_loss_bf16 $(shape7 4) $(run_args 4 "$LOSS_STEPS" 1 1) "${loss[@]}" \
    --lr_schedule.warmup_tokens $(( 30 * 4 * SEQ ))
  titanlite 170 7b_l4_loss_float8 $(shape7 4) $(run_args 4 "$LOSS_STEPS" 1 1) "${loss[@]}" \
    --lr_schedule.warmup_tokens $(( 30 * 4 * SEQ )) $FLOAT8
  python3 bench/compare_losses.py bf16_vs_float8_7b_l4 /tmp/runs/7b_l4_loss_bf16 /tmp/runs/7b_l4_loss_float8 \
    "$OUT/loss_curves" | tee -a "$OUT/cases.jsonl"
  cp /tmp/runs/7b_l4_loss_bf16/metrics.jsonl "$OUT/loss_curves/7b_l4_loss_bf16.jsonl" 2>/dev/null
  cp /tmp/runs/7b_l4_loss_float8/metrics.jsonl "$OUT/loss_curves/7b_l4_loss_float8.jsonl" 2>/dev/null
  titanlite 80 7b_l8_sac_adamw $(shape7 8) $(run_args 4 15 1) $SAC
  titanlite 90 7b_l8_sac_adamw8bit $(shape7 8) $(run_args 4 15 1) $SAC --optimizer.name adamw8bit
  titanlite 80 13b_l4_sac_mb2 $(shape13 4) $(run_args 2 10 1) $SAC
  ;;
extras)
  if [[ -z ${DRY:-} ]]; then  # torchao's CPUOffloadOptimizer needs CUDA
    titanlite 150 7b_l8_sac_cpu_offload $(shape7 8) $(run_args 4 10 1) $SAC --optimizer.cpu_offload true
  fi
  timeout 120 python3 -m pytest -q tests/test_optim.py -k gpu > "$OUT/gpu_tests.log" 2>&1
  tail -n 2 "$OUT/gpu_tests.log"
  if [[ -n ${DRY:-} ]]; then head_loss=(--tokens 256 --dim 64 --vocab 2048 --iters 2); else head_loss=(); fi
  timeout 150 python3 bench/bench_head_loss.py "${head_loss[@]}" | tee -a "$OUT/cases.jsonl"
  ;;
*) echo "usage: $0 compare|memory|extras" >&2; exit 2 ;;
esac

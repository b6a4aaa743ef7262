#!/usr/bin/env bash
# Two titanlite variants over 300 steps on the same data, seed and schedule (7B shape with 4 layers, seq
# 4096, micro-batch 4, compile, LR 3e-4 with 30 warmup steps, cosine): the mean loss of the last 50 steps,
# tokens/s and peak memory of each. One part per device call on one GPU (each under 10 minutes):
#   bench/compare_loss.sh float8      bf16 against float8 tensorwise (no AC)
#   bench/compare_loss.sh rowwise     bf16 against float8 rowwise, torchtitan's default recipe (no AC)
#   bench/compare_loss.sh adamw8bit   AdamW against 8-bit AdamW (selective AC); then CPU-offloaded AdamW
#                                     beside AdamW on the GPU (7B shape with 8 layers, selective AC, 10 steps)
#   bench/compare_loss.sh seed1       the rowwise pair at seed 1 (the seed-to-seed spread of both)
# One JSON line per run in $OUT/cases.jsonl (bench/gpu_case.sh) and one for the comparison
# (bench/compare_losses.py); both loss curves in $OUT/loss_curves/.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
source bench/shapes.sh
mkdir -p "$OUT/loss_curves"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
LOSS=(--metrics.log_freq 1 --lr_schedule.decay cosine --training.micro_batch_size 4
      --training.global_batch_tokens 16384 --training.steps 300 --lr_schedule.warmup_tokens $(( 30 * 16384 ))
      --optimizer.lr 3e-4 --compile.enable true)
SAC=(--activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0)
# train NAME "OVERRIDES": one 300-step run at seed $seed (default 0), its loss curve kept
train() { timeout 170 bench/gpu_case.sh titanlite "7b_l4_loss_$1" 1 $(seven_b 4) "${LOSS[@]}" --training.seed "${seed:-0}" $2
  cp "/tmp/runs/7b_l4_loss_$1/metrics.jsonl" "$OUT/loss_curves/7b_l4_loss_$1.jsonl"; }
# pair COMPARISON NAME_A NAME_B "OVERRIDES_A" "OVERRIDES_B": two runs, then their losses compared
pair() { train "$2" "$4"; train "$3" "$5"
  python3 bench/compare_losses.py "$1" "/tmp/runs/7b_l4_loss_$2" "/tmp/runs/7b_l4_loss_$3" "$OUT/loss_curves" \
    | tee -a "$RESULTS"; }
NOAC="--activation_checkpoint.mode none"
case ${1:-} in
float8)
  pair bf16_vs_float8_7b_l4 bf16 float8 "$NOAC" \
    "$NOAC --float8.enable true" ;;
rowwise)
  pair bf16_vs_float8_rowwise_7b_l4 bf16 float8_rowwise "$NOAC" \
    "$NOAC --float8.enable true --float8.recipe rowwise" ;;
seed1)
  seed=1
  pair bf16_vs_float8_rowwise_7b_l4_seed1 bf16_seed1 float8_rowwise_seed1 "$NOAC" \
    "$NOAC --float8.enable true --float8.recipe rowwise" ;;
adamw8bit)
  pair adamw_vs_adamw8bit_7b_l4 adamw adamw8bit "${SAC[*]} --optimizer.name adamw" \
    "${SAC[*]} --optimizer.name adamw8bit"
  eight=($(seven_b 8) $(bench_steps 4 10 1) --compile.enable true "${SAC[@]}")
  timeout 150 bench/gpu_case.sh titanlite 7b_l8_sac_adamw 1 "${eight[@]}"
  timeout 150 bench/gpu_case.sh titanlite 7b_l8_sac_cpu_offload 1 "${eight[@]}" --optimizer.cpu_offload true ;;
*) echo "usage: $0 float8|rowwise|adamw8bit|seed1" >&2; exit 2 ;;
esac

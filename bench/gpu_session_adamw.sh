#!/usr/bin/env bash
# The compiled AdamW (optimizer.implementation=compiled) on one H200, beside torch's fused AdamW and
# torchtitan, 7B shape with 8 layers, seq 4096, micro-batch 4, bf16, compile, no AC:
#   bench/gpu_session_adamw.sh speed    bench/bench_optimizer.py, then A = 1 (titanlite fused, compiled,
#                                       torchtitan) and A = 4 (titanlite compiled, torchtitan)
#   bench/gpu_session_adamw.sh fair     both on titanlite's corpus and tokenizer (bench/tt_assets.py) with
#                                       titanlite's LR schedule: no AC A = 1 and A = 4, selective AC A = 4
#   bench/gpu_session_adamw.sh fsdp2    (2 GPUs) full 32-layer 7B, FSDP 2, selective AC, same data: titanlite
#                                       (compiled AdamW) and torchtitan
#   bench/gpu_session_adamw.sh fsdp2_noac  (2 GPUs) the same without activation checkpointing (if it fits)
#   bench/gpu_session_adamw.sh rest     300 steps of adamw vs adamw8bit on the 7B shape with 4 layers (loss
#                                       curves under $OUT/loss_curves); CPU-offloaded AdamW
# One JSON line per case in $OUT/cases.jsonl (bench/gpu_case.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
source bench/gpu_env.sh
steps=20
NOAC=(--activation_checkpoint.mode none)
SAC=(--activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0)
COMPILED=(--optimizer.implementation compiled)
case ${1:-speed} in
speed)
  timeout 120 python3 bench/bench_optimizer.py | tee -a "$OUT/cases.jsonl"
  titanlite 7b_l8_noac_a1_fused 1 "${NOAC[@]}" --optimizer.implementation fused
  titanlite 7b_l8_noac_a1_compiled 1 "${NOAC[@]}" "${COMPILED[@]}"
  torchtitan 7b_l8_noac_a1 1 --activation_checkpoint.mode none
  titanlite 7b_l8_noac_a4_compiled 4 "${NOAC[@]}" "${COMPILED[@]}"
  torchtitan 7b_l8_noac_a4 4 --activation_checkpoint.mode none
  ;;
fair)
  python3 bench/tt_assets.py
  for accumulation in 1 4; do
    titanlite 7b_l8_noac_a${accumulation}_same_data $accumulation "${NOAC[@]}"
    torchtitan 7b_l8_noac_a${accumulation}_same_data $accumulation --activation_checkpoint.mode none
  done
  titanlite 7b_l8_sac_a4_same_data 4 "${SAC[@]}"
  torchtitan 7b_l8_sac_a4_same_data 4 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op
  ;;
fsdp2)
  python3 bench/tt_assets.py
  timeout 150 bench/gpu_case.sh titanlite 7b_fsdp2_sac_same_data 2 $(seven_b 32) $(bench_steps 4 15 2) \
    --compile.enable true --activation_checkpoint.mode selective
  timeout 150 bench/gpu_case.sh torchtitan 7b_fsdp2_sac_same_data 2 $(tt_seven_b 32) --training.local_batch_size 4 \
    --training.steps 15 --metrics.log_freq 5 --compile.enable "${TT_SCHEDULE[@]}" --activation_checkpoint.mode selective \
    --activation_checkpoint.selective_ac_option op
  ;;
fsdp2_noac)
  python3 bench/tt_assets.py
  timeout 110 bench/gpu_case.sh torchtitan 7b_fsdp2_noac_same_data 2 $(tt_seven_b 32) --training.local_batch_size 4 \
    --training.steps 12 --metrics.log_freq 4 --compile.enable "${TT_SCHEDULE[@]}" --activation_checkpoint.mode none
  timeout 110 bench/gpu_case.sh titanlite 7b_fsdp2_noac_same_data 2 $(seven_b 32) $(bench_steps 4 12 2) \
    --metrics.log_freq 4 --compile.enable true --activation_checkpoint.mode none
  ;;
rest)
  loss=(--training.seed 0 --metrics.log_freq 1 --lr_schedule.decay cosine --training.micro_batch_size 4
        --training.global_batch_tokens 16384 --training.steps 300 --lr_schedule.warmup_tokens $(( 30 * 16384 ))
        --optimizer.lr 3e-4 --compile.enable true "${SAC[@]}")
  for name in adamw adamw8bit; do
    timeout 170 bench/gpu_case.sh titanlite "7b_l4_loss_$name" 1 $(seven_b 4) "${loss[@]}" --optimizer.name $name
  done
  python3 bench/compare_losses.py adamw_vs_adamw8bit_7b_l4 /tmp/runs/7b_l4_loss_adamw /tmp/runs/7b_l4_loss_adamw8bit \
    "$OUT/loss_curves" | tee -a "$OUT/cases.jsonl"
  timeout 150 bench/gpu_case.sh titanlite 7b_l8_sac_cpu_offload 1 $(seven_b 8) $(bench_steps 4 10 1) \
    --compile.enable true "${SAC[@]}" --optimizer.cpu_offload true
  ;;
esac

#!/usr/bin/env bash
# One call on 2 x H200 (about 9 minutes):
#   1. the full 32-layer 7B shape, FSDP 2, selective AC, micro-batch 4 x 4096, compile: torchtitan bf16,
#      titanlite bf16 and titanlite float8 (tensorwise, float8 all-gather): tokens/s/GPU, MFU, memory;
#   2. issue 15: TP 2 against FSDP 2 on the 7B shape with 8 layers, the same 20 steps of data: loss curves;
#   3. side by side on one GPU each: 300 steps bf16 against float8 on the 7B shape with 4 layers (loss
#      curves), and AdamW against 8-bit AdamW (7B, 8 layers) then the 13B shape with 4 layers (memory).
# Results: JSON lines in $OUT/cases.jsonl (bench/gpu_case.sh), logs and loss curves under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
source bench/shapes.sh
thirteen_b() { echo --model.dim 5120 --model.n_heads 40 --model.n_kv_heads 8 --model.intermediate_size 13824 \
  --model.vocab_size 128256 --model.n_layers "$1" --training.seq_len 4096; }
# micro-batch $1, $2 steps, data-parallel degree $3: one micro-batch per step, warmup 5 steps, log every 5
steps() { local tokens=$(( $1 * 4096 * $3 ))
  echo --training.micro_batch_size "$1" --training.global_batch_tokens "$tokens" --training.steps "$2" \
    --metrics.log_freq 5 --lr_schedule.warmup_tokens $(( 5 * tokens )) --optimizer.lr 3e-4 --compile.enable true; }
SAC="--activation_checkpoint.mode selective"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 150 bench/gpu_case.sh torchtitan 7b_fsdp2_sac 2 $(tt_seven_b 32) --training.local_batch_size 4 \
  --training.steps 20 --metrics.log_freq 5 --compile.enable $SAC --activation_checkpoint.selective_ac_option op
timeout 130 bench/gpu_case.sh titanlite 7b_fsdp2_sac 2 $(seven_b 32) $(steps 4 20 2) $SAC
timeout 130 bench/gpu_case.sh titanlite 7b_fsdp2_sac_float8 2 $(seven_b 32) $(steps 4 20 2) $SAC --float8.enable true
# TP 2 and FSDP 2 on the same global batch (8 rows: DP 2 x micro-batch 4, or DP 1 x micro-batch 4 x A = 2)
timeout 80 bench/gpu_case.sh titanlite 7b_l8_tp2_sac 2 $(seven_b 8) $(steps 4 20 1) --training.global_batch_tokens 32768 \
  $SAC --parallelism.tensor_parallel_degree 2 --metrics.log_freq 1
timeout 80 bench/gpu_case.sh titanlite 7b_l8_fsdp2_sac 2 $(seven_b 8) $(steps 4 20 2) $SAC --metrics.log_freq 1
mkdir -p "$OUT/curves"
cp /tmp/runs/7b_l8_tp2_sac/metrics.jsonl "$OUT/curves/7b_l8_tp2_sac.jsonl"
cp /tmp/runs/7b_l8_fsdp2_sac/metrics.jsonl "$OUT/curves/7b_l8_fsdp2_sac.jsonl"
loss_run() { CUDA_VISIBLE_DEVICES=$1 timeout 120 bench/gpu_case.sh titanlite "$2" 1 $(seven_b 4) $(steps 4 300 1) \
  --metrics.log_freq 1 --lr_schedule.warmup_tokens $(( 30 * 4 * 4096 )) "${@:3}"; }
loss_run 0 7b_l4_loss_bf16 &
loss_run 1 7b_l4_loss_float8 --float8.enable true &
wait
cp /tmp/runs/7b_l4_loss_bf16/metrics.jsonl "$OUT/curves/7b_l4_loss_bf16.jsonl"
cp /tmp/runs/7b_l4_loss_float8/metrics.jsonl "$OUT/curves/7b_l4_loss_float8.jsonl"
(CUDA_VISIBLE_DEVICES=0 timeout 70 bench/gpu_case.sh titanlite 7b_l8_sac_adamw 1 $(seven_b 8) $(steps 4 15 1) $SAC
 CUDA_VISIBLE_DEVICES=0 timeout 75 bench/gpu_case.sh titanlite 7b_l8_sac_adamw8bit 1 $(seven_b 8) $(steps 4 15 1) $SAC \
   --optimizer.name adamw8bit) &
CUDA_VISIBLE_DEVICES=1 timeout 100 bench/gpu_case.sh titanlite 13b_l4_sac_mb2 1 $(thirteen_b 4) $(steps 2 10 1) $SAC &
wait
python3 - <<'PY'
import json, os
for line in open(os.environ["RESULTS"]):
    r = json.loads(line)
    print(r["framework"], r["name"], r.get("returncode"), round(r.get("tokens_per_second_per_gpu", 0)),
          round(r.get("mfu_percent", 0), 1), r.get("peak_allocated_gib") or r.get("peak_reserved_gib"),
          r.get("startup_peak_allocated_gib"), r.get("final_loss"))
PY

#!/usr/bin/env bash
# Side by side on one GPU (H100 or H200), 7B shape with 8 layers, seq 4096, micro-batch 4, A = 4, compile,
# no AC, titanlite and torchtitan 0.2.2 on the same data (bench/tt_assets.py) and LR schedule:
#   bench/compare_torchtitan_1gpu.sh speed   CUDA check of the chunked head + loss; bf16 titanlite (logits
#                                            path, chunked path) and torchtitan, alternating; float8 rowwise
#                                            titanlite and torchtitan
#   bench/compare_torchtitan_1gpu.sh again   the head + loss alone at chunk sizes 2048-16384, then the bf16
#                                            cases in the other order (torchtitan, titanlite at the fastest
#                                            chunk size, titanlite's logits path)
#   bench/compare_torchtitan_1gpu.sh chunked  titanlite bf16 alone: chunked head (4,096) then the logits path
#   bench/compare_torchtitan_1gpu.sh tt030   whether torchtitan 0.3.0 (.whl/tt030/) imports on this torch
#   bench/compare_torchtitan_1gpu.sh whole   the full 32-layer 7B (float8 rowwise, adamw8bit, selective
#                                            AC on an H200, full AC on an H100), with `python -m titanlite.plan`'s
#                                            estimate for it
#   bench/compare_torchtitan_1gpu.sh profile  one profiled step of titanlite bf16 and float8 rowwise (no AC,
#                                            A = 4), kernel time by group (bench/trace_summary.py)
#   bench/compare_torchtitan_1gpu.sh step    step weights (parallel/step_weights.py) against autocast's casts,
#                                            and torchtitan, in the order tt, step, autocast, autocast, step, tt;
#                                            the two titanlite variants' losses compared (bench/compare_losses.py)
#   bench/compare_torchtitan_1gpu.sh thirteen  the 40-layer 13B on one H200 (float8 rowwise, adamw8bit, full
#                                            AC; plan: 118 GiB), with plan's estimate
# One JSON line per case in $OUT/cases.jsonl (bench/gpu_case.sh); energy per token in each.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
source bench/gpu_env.sh
export BENCH_SESSION="bench/compare_torchtitan_1gpu.sh ${1:-speed}:"
steps=${STEPS:-15} case_timeout=130
NOAC=(--activation_checkpoint.mode none)
LOGITS=(--training.loss_chunk_tokens 0)
TT_ROWWISE=(--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name rowwise)
case ${1:-speed} in
speed)
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
  timeout 90 python3 bench/bench_head_loss.py --check | tee -a "$OUT/checks.txt"
  python3 bench/tt_assets.py
  titanlite 7b_l8_noac_a4_logits 4 "${NOAC[@]}" "${LOGITS[@]}"
  torchtitan 7b_l8_noac_a4 4 --activation_checkpoint.mode none
  titanlite 7b_l8_noac_a4_chunked 4 "${NOAC[@]}"
  torchtitan 7b_l8_noac_a4_float8_rowwise 4 --activation_checkpoint.mode none "${TT_ROWWISE[@]}"
  titanlite 7b_l8_noac_a4_float8_rowwise 4 "${NOAC[@]}" --float8.enable true --float8.recipe rowwise
  ;;
again)
  timeout 150 python3 bench/bench_head_loss.py --chunk-tokens 2048,4096,8192,16384 | tee "$OUT/head_loss.json"
  best=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(min((v, k.split('_')[1]) for k, v in
    r.items() if k.startswith('chunked_') and k.endswith('_ms'))[1])" "$OUT/head_loss.json" || echo 4096)
  [[ -d .tt/tests/assets/c4_test ]] || python3 bench/tt_assets.py
  torchtitan 7b_l8_noac_a4 4 --activation_checkpoint.mode none
  titanlite "7b_l8_noac_a4_chunked$best" 4 "${NOAC[@]}" --training.loss_chunk_tokens "$best"
  titanlite 7b_l8_noac_a4_logits 4 "${NOAC[@]}" "${LOGITS[@]}"
  ;;
chunked)
  titanlite 7b_l8_noac_a4_chunked 4 "${NOAC[@]}"
  titanlite 7b_l8_noac_a4_logits 4 "${NOAC[@]}" "${LOGITS[@]}"
  ;;
tt030)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site030 .whl/tt030/*.whl > /tmp/pip030.log 2>&1
  PYTHONPATH=/tmp/site030:$PYTHONPATH timeout 60 python3 -c "import torch, torchtitan.train as t;
print('torchtitan 0.3.0 imports on torch', torch.__version__, t.__file__)" 2>&1 | tail -3 | tee "$OUT/tt030.txt"
  ;;
whole)
  # Selective AC where the card has the memory for it (H200), else full AC (H100: plan 65 GiB against 98).
  gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print $1 / 1024}')
  ac=$(awk -v g="$gib" 'BEGIN {print (g > 110) ? "selective" : "full"}')
  settings=($(seven_b 32) $(bench_steps 4 "$steps" 1) --compile.enable true --float8.enable true
            --float8.recipe rowwise --optimizer.name adamw8bit --activation_checkpoint.mode "$ac")
  python3 -m titanlite.plan --config 7b_4k --ngpu 1 --parallelism.tensor_parallel_degree 1 "${settings[@]}" \
    --gpu-memory-gib "$gib" 2>&1 | tee "$OUT/plan_7b_l32_$ac.txt"
  timeout 280 bench/gpu_case.sh titanlite "7b_l32_${ac}_float8_rowwise_adamw8bit" 1 "${settings[@]}"
  ;;
profile)
  steps=12
  profiling=(--profiling.enable_profiling true --profiling.profile_freq 10 --profiling.profile_warmup 2
             --profiling.profile_active 1)
  titanlite profile_bf16 4 "${NOAC[@]}" "${profiling[@]}"
  titanlite profile_float8_rowwise 4 "${NOAC[@]}" --float8.enable true --float8.recipe rowwise "${profiling[@]}"
  python3 bench/trace_summary.py $(for name in bf16 float8_rowwise; do
    echo "$name=$(ls /tmp/runs/profile_$name/profile_traces/*/rank0_trace.json | tail -1)"; done) --top 30 \
    --json "$OUT/profile.json" | tee "$OUT/profile.txt"
  ;;
step)
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
  python3 bench/tt_assets.py
  STEP=(--training.bf16_step_weights true) AUTOCAST=(--training.bf16_step_weights false)
  torchtitan 7b_l8_noac_a4 4 --activation_checkpoint.mode none
  titanlite 7b_l8_noac_a4_step 4 "${NOAC[@]}" "${STEP[@]}"
  titanlite 7b_l8_noac_a4_autocast 4 "${NOAC[@]}" "${AUTOCAST[@]}"
  titanlite 7b_l8_noac_a4_autocast_2 4 "${NOAC[@]}" "${AUTOCAST[@]}"
  titanlite 7b_l8_noac_a4_step_2 4 "${NOAC[@]}" "${STEP[@]}"
  torchtitan 7b_l8_noac_a4_2 4 --activation_checkpoint.mode none
  # Logged every 5 steps: the mean over steps 5, 10, 15 and both curves (CSV) in $OUT/loss_curves.
  python3 bench/compare_losses.py autocast_vs_step_weights_7b_l8 /tmp/runs/7b_l8_noac_a4_autocast \
    /tmp/runs/7b_l8_noac_a4_step "$OUT/loss_curves" --last 3 | tee -a "$OUT/step_losses.jsonl"
  ;;
thirteen)
  settings=($(thirteen_b 40) $(bench_steps 4 "$steps" 1) --compile.enable true --float8.enable true
            --float8.recipe rowwise --optimizer.name adamw8bit --activation_checkpoint.mode full)
  python3 -m titanlite.plan --config 7b_4k --ngpu 1 --parallelism.tensor_parallel_degree 1 "${settings[@]}" \
    --gpu-memory-gib 140 2>&1 | tee "$OUT/plan_13b_l40_full.txt"
  timeout 330 bench/gpu_case.sh titanlite 13b_l40_full_float8_rowwise_adamw8bit 1 "${settings[@]}"
  ;;
esac

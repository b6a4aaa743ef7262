#!/usr/bin/env bash
# The 1-GPU session (one 10-minute device call per part):
#   compare: titanlite and torchtitan side by side on the 7B shape with 8 layers (micro-batch 4 x 4096,
#            compile; selective AC and no AC), then the GPU-only FlexAttention test and the health bench;
#   extras:  checkpoint and memory benchmarks, and a 3B-shape run (head_dim 100) through run_train.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
export OUT=${OUT:-/tmp/out}
if [[ ${1:-compare} == compare ]]; then
  tt() { echo $(tt_seven_b 8) --training.local_batch_size 4 --training.steps 30 --compile.enable; }
  timeout 130 bench/gpu_case.sh torchtitan 7b_l8_sac 1 $(tt) --activation_checkpoint.mode selective
  timeout 130 bench/gpu_case.sh titanlite 7b_l8_sac 1 $(seven_b 8) $(bench_steps 4 30) --compile.enable true --activation_checkpoint.mode selective
  timeout 130 bench/gpu_case.sh torchtitan 7b_l8_noac 1 $(tt) --activation_checkpoint.mode none
  timeout 130 bench/gpu_case.sh titanlite 7b_l8_noac 1 $(seven_b 8) $(bench_steps 4 30) --compile.enable true
  timeout 90 python3 -m pytest -q tests/test_attention.py -k flex > "$OUT/flex_gpu_test.log" 2>&1; tail -n 2 "$OUT/flex_gpu_test.log"
  timeout 120 python3 bench/bench_health.py --out "$OUT/health.json" > "$OUT/health.log" 2>&1; tail -n 4 "$OUT/health.log"
else
  timeout 200 python3 bench/bench_checkpoint.py --layers 4 --folder /tmp/ckb --out "$OUT/checkpoint.json" > "$OUT/checkpoint.log" 2>&1; tail -n 3 "$OUT/checkpoint.log"
  timeout 240 python3 bench/bench_memory.py --out "$OUT/memory.json" > "$OUT/memory.log" 2>&1; tail -n 8 "$OUT/memory.log"
  timeout 100 bench/gpu_case.sh titanlite 3b_l4 1 $(three_b 4) $(bench_steps 8 15) --compile.enable true
fi

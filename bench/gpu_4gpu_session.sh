#!/usr/bin/env bash
# The 4-GPU session: titanlite and torchtitan side by side on the full 32-layer 7B shape
# (FSDP 4; FSDP 2 x TP 2; compile + selective AC, micro-batch 4 x 4096), then the 8-layer
# layouts that only fit on fewer GPUs or that TP alone covers (FSDP 2, TP 2, TP 4).
# usage: bench/gpu_4gpu_session.sh compare|layouts   (each part fits one 10-minute device call)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
export OUT=${OUT:-/tmp/out}
tt_args() { echo $(tt_seven_b 32) --training.local_batch_size 4 --training.steps 25 --compile.enable --activation_checkpoint.mode selective; }
if [[ ${1:-compare} == compare ]]; then
timeout 145 bench/gpu_case.sh titanlite 7b_l32_fsdp4 4 $(seven_b 32) $(bench_steps 4 25 4) --compile.enable true --activation_checkpoint.mode selective
timeout 145 bench/gpu_case.sh torchtitan 7b_l32_fsdp4 4 $(tt_args)
timeout 145 bench/gpu_case.sh titanlite 7b_l32_fsdp2_tp2 4 $(seven_b 32) $(bench_steps 4 25 2) --compile.enable true --activation_checkpoint.mode selective --parallelism.tensor_parallel_degree 2
timeout 145 bench/gpu_case.sh torchtitan 7b_l32_fsdp2_tp2 4 $(tt_args) --parallelism.tensor_parallel_degree 2
else
BENCH_STEPS=20 WARMUP_STEPS=5 timeout 500 bench/bench_layouts.sh "$OUT/layouts" fsdp2 tp2 tp4
fi

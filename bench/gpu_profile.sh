#!/usr/bin/env bash
# One profiled step each of titanlite and torchtitan (7B shape, 8 layers, seq 4096, micro-batch 4, bf16,
# compile), summarized side by side per step by bench/trace_summary.py:
#   bench/gpu_profile.sh [A] [AC]     A micro-batches per step (default 4), AC none|selective (default none)
# Writes $OUT/profile_<ac>_a<A>.txt (the summary), .json, and the gzipped traces when they fit.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/shapes.sh
source bench/gpu_env.sh
accumulation=${1:-4} ac=${2:-none} steps=12
tag=${ac}_a$accumulation
profile=(--profiling.enable_profiling true --profiling.profile_freq 10 --profiling.profile_warmup 2
         --profiling.profile_active 1)
if [[ $ac == selective ]]; then
  tl_ac=(--activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0)
  tt_ac=(--activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op)
else
  tl_ac=(--activation_checkpoint.mode none); tt_ac=(--activation_checkpoint.mode none)
fi
timeout 200 bench/gpu_case.sh titanlite "profile_$tag" 1 $(seven_b 8) $(bench_steps 4 $steps "$accumulation") \
  --compile.enable true "${tl_ac[@]}" "${profile[@]}"
timeout 200 bench/gpu_case.sh torchtitan "profile_$tag" 1 $(tt_seven_b 8) --training.local_batch_size 4 \
  --training.global_batch_size $(( 4 * accumulation )) --training.steps $steps --metrics.log_freq 5 --compile.enable \
  "${tt_ac[@]}" --profiling.enable_profiling --profiling.profile_freq 10 --profiling.profiler_warmup 2 \
  --profiling.profiler_active 1
tl_trace=$(ls /tmp/runs/profile_$tag/profile_traces/*/rank0_trace.json | tail -1)
tt_trace=$(ls /tmp/tt/profile_$tag/profile_traces/*/rank0_trace.json | tail -1)
python3 bench/trace_summary.py "torchtitan=$tt_trace" "titanlite=$tl_trace" --top 40 \
  --json "$OUT/profile_$tag.json" | tee "$OUT/profile_$tag.txt"
for pair in "titanlite:$tl_trace" "torchtitan:$tt_trace"; do
  gzip -c "${pair#*:}" > "$OUT/trace_${pair%%:*}_$tag.json.gz"
  (( $(stat -c %s "$OUT/trace_${pair%%:*}_$tag.json.gz") < 15000000 )) || rm "$OUT/trace_${pair%%:*}_$tag.json.gz"
done
timeout 150 python3 bench/bench_head_loss.py | tee -a "$OUT/cases.jsonl"

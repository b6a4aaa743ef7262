#!/usr/bin/env bash
# One 1 x H200 call: the issue-10 restructure against the commit before it, and the checkpoint checksum cost.
#   .old/ holds titanlite, train_configs, run_train.sh and bench/ of the earlier commit (git worktree
#   or `git archive 0996534 | tar -x -C .old`), carried to the device machine beside this tree;
#   .whl/ the wheels of bench/gpu_case.sh's torchtitan runs (datasets, torchao, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.sm --format=csv,noheader
source bench/shapes.sh
case_args() { echo $(seven_b 8) $(bench_steps 4 30) --compile.enable true --activation_checkpoint.mode selective; }
timeout 170 bench/gpu_case.sh titanlite 7b_l8_sac 1 $(case_args)
(cd .old && timeout 170 bench/gpu_case.sh titanlite 7b_l8_sac_before 1 $(case_args))
timeout 220 python3 bench/bench_checkpoint.py --layers 4 --folder /tmp/ckb --repeats 1 --async-saves 0 \
  --out "$OUT/checkpoint.json" > "$OUT/checkpoint.log" 2>&1; tail -n 3 "$OUT/checkpoint.log"
grep -h "step: 30" "$OUT"/logs/*.log | cut -c1-240

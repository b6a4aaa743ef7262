#!/usr/bin/env bash
# One benchmark case on the GPU machine; appends a JSON line to $RESULTS (default $OUT/cases.jsonl).
#   bench/gpu_case.sh titanlite NAME NGPU [run_train.sh overrides...]
#   bench/gpu_case.sh torchtitan NAME NGPU [torchtitan overrides...]
# tokens/s, MFU and peak memory of both frameworks as bench/steady_state.py defines them. The
# torchtitan side needs torchtitan 0.2.2 importable (bench/gpu_env.sh installs the wheels in .whl/).
set -uo pipefail
framework=$1 name=$2 ngpu=$3; shift 3
OUT=${OUT:-/tmp/out}; RESULTS=${RESULTS:-$OUT/cases.jsonl}; LOGS=${LOGS:-$OUT/logs}
mkdir -p "$LOGS"
log="$LOGS/$framework-$name.log"
# GPU 0's SM clock, power and temperature twice a second: at the 700 W cap the clock moves with the
# work's power, so equal kernels can run at unequal speed (bench/summarize_case.py reports the median).
export GPU_SAMPLES="$LOGS/$framework-$name.gpu.csv"
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 500 \
  > "$GPU_SAMPLES" 2>/dev/null & sampler=$!
start=$(date +%s)
if [[ $framework == titanlite ]]; then
  dump=/tmp/runs/$name
  rm -rf "$dump"
  NGPU=$ngpu LOG_RANK=0 ./run_train.sh --job.dump_folder "$dump" --metrics.enable_tensorboard false "$@" >"$log" 2>&1
  rc=$?
  metrics="$dump/metrics.jsonl"
else
  # torchtitan's trainer (bench/torchtitan_run.py adds our shapes as flavours) on titanlite's corpus and
  # tokenizer, written under .tt/ by bench/tt_assets.py: the same tokens on both sides.
  [[ -d .tt/tests/assets/tokenizer_titanlite ]] || python3 bench/tt_assets.py >"$log.assets" 2>&1
  (cd .tt && torchrun --standalone --nproc_per_node "$ngpu" --local-ranks-filter 0 --role rank --tee 3 \
     "$OLDPWD/bench/torchtitan_run.py" --model.name llama3 --model.hf_assets_path tests/assets/tokenizer_titanlite \
     --training.dataset c4_test --metrics.log_freq 1 --job.dump_folder /tmp/tt/$name "$@") >"$log" 2>&1
  rc=$?
  metrics=""
fi
kill $sampler 2>/dev/null
python3 bench/summarize_case.py "$framework" "$name" "$ngpu" "$rc" "$(( $(date +%s) - start ))" "$log" "$metrics" \
  "$*" >> "$RESULTS"
tail -n 2 "$RESULTS"

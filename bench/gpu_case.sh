#!/usr/bin/env bash
# One benchmark case on the GPU machine; appends a JSON line to $RESULTS (default $OUT/cases.jsonl).
#   bench/gpu_case.sh titanlite NAME NGPU [run_train.sh overrides...]
#   bench/gpu_case.sh torchtitan NAME NGPU [torchtitan overrides...]
# titanlite: tokens/s, MFU and memory are the mean over logged steps after the first third
# (compile and warm-up excluded). torchtitan: its logged tps/mfu/memory over steps 20-30, as the
# peer figures were read. Needs .tt/ (torchtitan assets) and .whl/ installed into PYTHONPATH.
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
  # titanlite's tokenizer and corpus when bench/tt_assets.py has written them: the same tokens on both sides.
  TT_TOKENIZER=tests/assets/tokenizer_titanlite
  [[ -d .tt/$TT_TOKENIZER ]] || TT_TOKENIZER=tests/assets/tokenizer
  (cd .tt && torchrun --standalone --nproc_per_node "$ngpu" --local-ranks-filter 0 --role rank --tee 3 \
     torchtitan_run.py --model.name llama3 --model.hf_assets_path "$TT_TOKENIZER" \
     --training.dataset c4_test --metrics.log_freq 1 --job.dump_folder /tmp/tt/$name "$@") >"$log" 2>&1
  rc=$?
  metrics=""
fi
kill $sampler 2>/dev/null
python3 bench/summarize_case.py "$framework" "$name" "$ngpu" "$rc" "$(( $(date +%s) - start ))" "$log" "$metrics" \
  "$*" >> "$RESULTS"
tail -n 2 "$RESULTS"

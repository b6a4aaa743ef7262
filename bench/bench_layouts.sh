#!/usr/bin/env bash
# Parallel layouts of the 7B shape (8 layers) on one 4-GPU node: tokens/s/GPU, MFU, peak memory.
#
#   bench/bench_layouts.sh OUTDIR [LAYOUT ...]       # default: all five layouts below
#
# Each layout trains ~30 steps through run_train.sh (bf16, compile on, selective per-op AC, micro-batch
# 2 x 4096 tokens per data-parallel rank, no accumulation) and writes OUTDIR/<layout>.json: tokens/s/GPU
# and MFU after warm-up and the peak allocated / reserved memory (as bench/steady_state.py defines them),
# plus the command, GPU, torch version, date.
#
# BENCH_TINY=1 shrinks everything to the debug shape on CPU (gloo) to check the plumbing in seconds.
# Knobs: BENCH_LAYERS (8), BENCH_STEPS (30), BENCH_MICRO_BATCH (2).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/bench_layouts.sh OUTDIR [LAYOUT ...]}; shift
mkdir -p "$out"
layouts=("$@")
[[ ${#layouts[@]} -eq 0 ]] && layouts=(fsdp2 fsdp4 tp2 tp4 fsdp2_tp2)

layers=${BENCH_LAYERS:-8} steps=${BENCH_STEPS:-30} micro_batch=${BENCH_MICRO_BATCH:-2}
if [[ -n "${BENCH_TINY:-}" ]]; then
  seq=32
  shape=(--model.dim 64 --model.n_layers 2 --model.n_heads 4 --model.n_kv_heads 4 --model.intermediate_size 128
         --model.vocab_size 2048 --training.seq_len $seq --training.device cpu --data.default_num_documents 300
         --compile.enable false)
else
  seq=4096
  # The seed's 7B: d 4096, 32 heads (head_dim 128), 8 KV heads, SwiGLU 11008, Llama 3 vocabulary.
  shape=(--model.dim 4096 --model.n_layers "$layers" --model.n_heads 32 --model.n_kv_heads 8
         --model.intermediate_size 11008 --model.vocab_size 128256 --training.seq_len $seq
         --training.mixed_precision bf16 --compile.enable true)
fi

for layout in "${layouts[@]}"; do
  case $layout in
    fsdp2)     ngpu=2 tp=1 ;;
    fsdp4)     ngpu=4 tp=1 ;;
    tp2)       ngpu=2 tp=2 ;;
    tp4)       ngpu=4 tp=4 ;;
    fsdp2_tp2) ngpu=4 tp=2 ;;
    *) echo "unknown layout $layout: use fsdp2 fsdp4 tp2 tp4 fsdp2_tp2" >&2; exit 2 ;;
  esac
  dp=$(( ngpu / tp ))
  dump=$(mktemp -d "${TMPDIR:-/tmp}/bench_layouts.$layout.XXXX")
  args=(--config debug_model "${shape[@]}" --parallelism.tensor_parallel_degree $tp
        --training.micro_batch_size "$micro_batch" --training.global_batch_tokens $(( micro_batch * seq * dp ))
        --training.steps "$steps" --lr_schedule.warmup_tokens $(( 5 * micro_batch * seq * dp )) --optimizer.lr 3e-4
        --activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0
        --metrics.log_freq 5 --metrics.enable_tensorboard false --checkpoint.enable false
        --job.dump_folder "$dump")
  devices=$(seq -s, 0 $(( ngpu - 1 )))
  command="CUDA_VISIBLE_DEVICES=$devices NGPU=$ngpu ./run_train.sh ${args[*]}"
  echo "== $layout: $command"
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES=$devices NGPU=$ngpu ./run_train.sh "${args[@]}" > "$dump/train.log" 2>&1
  rc=$?
  tail -n 3 "$dump/train.log"
  PYTHONPATH=bench${PYTHONPATH:+:$PYTHONPATH} python3 - "$layout" "$ngpu" "$tp" "$rc" "$(( $(date +%s) - start ))" \
    "$command" "$dump" "$out" <<'EOF'
import datetime, json, re, sys
import torch
from steady_state import summarize_steps, titanlite_steps
layout, ngpu, tp, rc, wall, command, dump, out = sys.argv[1:]
record = {"layout": layout, "ngpu": int(ngpu), "tensor_parallel": int(tp), "data_parallel": int(ngpu) // int(tp),
          "returncode": int(rc), "wall_s": int(wall), "command": command,
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
try:
    rows = [json.loads(line) for line in open(f"{dump}/metrics.jsonl")]
except FileNotFoundError:
    rows = []
record.update(summarize_steps(titanlite_steps(rows)))
record["steps_averaged"] = record.pop("steps_logged")
steady = record["steps_averaged"]
if rows:
    record["final_loss"] = rows[-1]["loss"]
log = open(f"{dump}/train.log", errors="replace").read()
match = re.search(r"compile: first step took ([\d.]+) s", log)
if match:
    record["first_step_s_with_compile"] = float(match[1])
if int(rc) != 0 or not steady:
    record["log_tail"] = log[-3000:]
json.dump(record, open(f"{out}/{layout}.json", "w"), indent=2)
print(json.dumps({k: v for k, v in record.items() if k not in ("command", "log_tail")}))
EOF
done

# The README table, from every layout JSON in OUTDIR.
python3 - "$out" <<'EOF2' | tee "$out/table.md"
import glob, json, sys
print("| layout | GPUs | TP x DP | tokens/s/GPU | MFU % | peak alloc GiB | peak reserved GiB | first step (compile) s |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    r = json.load(open(path))
    if "layout" not in r:
        continue
    cell = lambda key, fmt: fmt.format(r[key]) if key in r else "n/a"
    print(f"| {r['layout']} | {r['ngpu']} | {r['tensor_parallel']} x {r['data_parallel']} | "
          f"{cell('tokens_per_second_per_gpu', '{:,.0f}')} | {cell('mfu_percent', '{:.1f}')} | "
          f"{cell('peak_allocated_gib', '{:.1f}')} | {cell('peak_reserved_gib', '{:.1f}')} | "
          f"{cell('first_step_s_with_compile', '{:.0f}')} |" + ("" if r["returncode"] == 0 else " FAILED"))
EOF2

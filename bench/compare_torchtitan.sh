#!/usr/bin/env bash
# titanlite against torchtitan 0.2.2's own trainer, side by side in one device call, on the same data
# (titanlite's corpus and tokenizer, bench/tt_assets.py) with the same LR schedule (3e-4, 5 warmup steps,
# cosine to 0.1): the 7B shape (bench/shapes.sh), seq 4096, micro-batch 4, bf16, torch.compile; selective
# AC per op on both sides. One part per device call (each under 10 minutes):
#   bench/compare_torchtitan.sh 1         1 GPU, 8 layers: no AC A = 1, no AC A = 4, selective AC A = 4
#   bench/compare_torchtitan.sh 1_float8  1 GPU, 8 layers, selective AC, A = 1: bf16 and float8 tensorwise
#                                         (the output head in bf16 on both sides)
#   bench/compare_torchtitan.sh 2         2 GPUs, 32 layers, FSDP 2: selective AC, no AC; titanlite float8
#   bench/compare_torchtitan.sh 4         4 GPUs, 32 layers, selective AC: FSDP 4, FSDP 2 x TP 2
# A = micro-batches accumulated per step. On the GPU machine, from the repository root, with the wheels
# of torchtitan 0.2.2 and its dependencies in .whl/ (bench/gpu_env.sh installs them); one JSON line per
# case in $OUT/cases.jsonl (bench/gpu_case.sh), its logs in $OUT/logs. `python bench/perf_table.py`
# tabulates the lines once they are copied to bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
source bench/shapes.sh
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
SAC_TL=(--activation_checkpoint.mode selective --activation_checkpoint.selective_blocks 0)
SAC_TT=(--activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op)
NOAC=(--activation_checkpoint.mode none)
FLOAT8_TT=(--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise
           --quantize.linear.float8.filter_fqns output)
# titanlite NAME LAYERS NGPU ROWS STEPS [overrides]: ROWS micro-batches per step over all GPUs (A x DP)
titanlite() { local name=$1 layers=$2 ngpu=$3 rows=$4 steps=$5; shift 5
  timeout 170 bench/gpu_case.sh titanlite "$name" "$ngpu" $(seven_b "$layers") $(bench_steps 4 "$steps" "$rows") \
    --compile.enable true "$@"; }
torchtitan() { local name=$1 layers=$2 ngpu=$3 rows=$4 steps=$5; shift 5
  timeout 170 bench/gpu_case.sh torchtitan "$name" "$ngpu" $(tt_seven_b "$layers") --training.local_batch_size 4 \
    --training.global_batch_size $(( 4 * rows )) --training.steps "$steps" --metrics.log_freq 5 --compile.enable \
    --optimizer.lr 3e-4 --lr_scheduler.decay_type cosine --lr_scheduler.min_lr_factor 0.1 "$@"; }
both() { local name=$1 layers=$2 ngpu=$3 rows=$4 steps=$5 tl=$6 tt=$7
  titanlite "$name" "$layers" "$ngpu" "$rows" "$steps" ${!tl}
  torchtitan "$name" "$layers" "$ngpu" "$rows" "$steps" ${!tt}; }
python3 bench/tt_assets.py
case ${1:-1} in
1)
  both 7b_l8_noac_a1_same_data 8 1 1 20 'NOAC[@]' 'NOAC[@]'
  both 7b_l8_noac_a4_same_data 8 1 4 20 'NOAC[@]' 'NOAC[@]'
  both 7b_l8_sac_a4_same_data 8 1 4 20 'SAC_TL[@]' 'SAC_TT[@]' ;;
1_float8)
  both 7b_l8_sac 8 1 1 20 'SAC_TL[@]' 'SAC_TT[@]'
  titanlite 7b_l8_sac_float8 8 1 1 20 "${SAC_TL[@]}" --float8.enable true
  torchtitan 7b_l8_sac_float8 8 1 1 20 "${SAC_TT[@]}" "${FLOAT8_TT[@]}" ;;
2)
  both 7b_fsdp2_sac_same_data 32 2 2 15 'SAC_TL[@]' 'SAC_TT[@]'
  both 7b_fsdp2_noac_same_data 32 2 2 12 'NOAC[@]' 'NOAC[@]'
  titanlite 7b_fsdp2_sac_float8 32 2 2 15 "${SAC_TL[@]}" --float8.enable true ;;
4)
  both 7b_l32_fsdp4 32 4 4 25 'SAC_TL[@]' 'SAC_TT[@]'
  TP2=(--parallelism.tensor_parallel_degree 2)
  titanlite 7b_l32_fsdp2_tp2 32 4 2 25 "${SAC_TL[@]}" "${TP2[@]}"
  torchtitan 7b_l32_fsdp2_tp2 32 4 2 25 "${SAC_TT[@]}" "${TP2[@]}" ;;
*) echo "usage: $0 1|1_float8|2|4" >&2; exit 2 ;;
esac

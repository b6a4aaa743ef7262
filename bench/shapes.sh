# Overrides for the seed's model shapes with a reduced layer count (source this file).
# 7B: d 4096, 32 heads, 8 KV heads, SwiGLU 11008; 3B: d 3200, 32/8 heads, 8640; vocab 128,256.
seven_b() { echo --model.dim 4096 --model.n_heads 32 --model.n_kv_heads 8 --model.intermediate_size 11008 \
  --model.vocab_size 128256 --model.n_layers "$1" --training.seq_len 4096; }
three_b() { echo --model.dim 3200 --model.n_heads 32 --model.n_kv_heads 8 --model.intermediate_size 8640 \
  --model.vocab_size 128256 --model.n_layers "$1" --training.seq_len 4096; }
# A benchmark step: micro-batch $1, no accumulation, $2 steps, log every 5, warmup 5 steps.
bench_steps() { echo --training.micro_batch_size "$1" --training.global_batch_tokens $(( $1 * 4096 * ${3:-1} )) \
  --training.steps "$2" --metrics.log_freq 5 --lr_schedule.warmup_tokens $(( 5 * $1 * 4096 * ${3:-1} )) --optimizer.lr 3e-4; }
tt_seven_b() { echo --model.flavor "seed7b_l$1" --training.seq_len 4096 --lr_scheduler.warmup_steps 5; }
# 13B: d 5120, 40 heads, 8 KV heads, SwiGLU 13824.
thirteen_b() { echo --model.dim 5120 --model.n_heads 40 --model.n_kv_heads 8 --model.intermediate_size 13824 \
  --model.vocab_size 128256 --model.n_layers "$1" --training.seq_len 4096; }
# Side-by-side cases on one GPU, 7B shape with $layers layers (default 8), micro-batch 4, A = $2, compile,
# $steps steps (the caller sets steps; case_timeout in s, default 150); torchtitan on titanlite's LR schedule
# (3e-4, warmup 5 steps from tt_seven_b, cosine to 0.1). Usage: titanlite NAME A [overrides...]
TT_SCHEDULE=(--optimizer.lr 3e-4 --lr_scheduler.decay_type cosine --lr_scheduler.min_lr_factor 0.1)
titanlite() { local name=$1 accumulation=$2; shift 2
  timeout "${case_timeout:-150}" bench/gpu_case.sh titanlite "$name" 1 $(seven_b "${layers:-8}") \
    $(bench_steps 4 "$steps" "$accumulation") --compile.enable true "$@"; }
torchtitan() { local name=$1 accumulation=$2; shift 2
  timeout "${case_timeout:-150}" bench/gpu_case.sh torchtitan "$name" 1 $(tt_seven_b "${layers:-8}") \
    --training.local_batch_size 4 --training.global_batch_size $(( 4 * accumulation )) --training.steps "$steps" \
    --metrics.log_freq 5 --compile.enable "${TT_SCHEDULE[@]}" "$@"; }

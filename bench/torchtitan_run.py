"""torchtitan 0.2.2's own llama3 trainer on the shapes titanlite is compared at (bench/gpu_case.sh).

torchtitan ships the Llama 3 sizes only; this registers the shapes of bench/shapes.sh as extra
llama3 flavours, then calls torchtitan's `main` unchanged, with torchtitan's command line:
  seed7b_l4, seed7b_l8, seed7b_l32   d 4096, 32 query / 8 KV heads, vocab 128,256, 4 / 8 / 32 layers;
                                     SwiGLU 11008 from torchtitan's multiple-of-256 rule, as titanlite's
  seed3b_l8                          d 3200, 32 / 8 heads (head_dim 100), SwiGLU 8640, 8 layers
Run from the folder that holds tests/assets/ (bench/tt_assets.py writes it under .tt/):
    torchrun --standalone --nproc_per_node 1 PATH/bench/torchtitan_run.py --model.name llama3 \\
        --model.flavor seed7b_l8 --model.hf_assets_path tests/assets/tokenizer_titanlite \\
        --training.dataset c4_test --training.local_batch_size 4 --training.seq_len 4096 ...
"""

from torchtitan.models.llama3 import TransformerModelArgs, llama3_args
from torchtitan.train import Trainer, main

SEVEN_B = dict(dim=4096, n_heads=32, n_kv_heads=8, multiple_of=256, rope_theta=10000, vocab_size=128256)
for layers in (4, 8, 32):
    llama3_args[f"seed7b_l{layers}"] = TransformerModelArgs(n_layers=layers, **SEVEN_B)
# SwiGLU 8640: int(1.0125 * 8533) rounded up to a multiple of 64, as the 3B recipe sets it
llama3_args["seed3b_l8"] = TransformerModelArgs(dim=3200, n_layers=8, n_heads=32, n_kv_heads=8, multiple_of=64,
                                                ffn_dim_multiplier=1.0125, rope_theta=10000, vocab_size=128256)

if __name__ == "__main__":
    main(Trainer)

"""The LLaMA-style model, its attention kernels, RoPE, the loss, its size; no parallelism."""

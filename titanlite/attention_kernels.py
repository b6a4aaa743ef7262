"""Which SDPA kernel runs the model's attention, checked once at start-up; head-dim padding.

Where no fast kernel (flash, memory-efficient, cuDNN) accepts a shape, PyTorch runs the math
kernel without a word: it materializes the (seq x seq) score matrix, quadratic in memory and
many times slower. The seed's 3B shape has head_dim 100 (3200 / 32), which is not a multiple
of 8: on H100 with torch 2.11 the memory-efficient and cuDNN kernels reject it and flash takes
it, and other builds differ. So at start-up titanlite runs the model's exact attention call
(dtype, device, GQA ratio, causal, scale) on a tiny input, records which aten kernel ran, and
  - `none`: uses the true head_dim, and fails if only the math kernel takes it;
  - `N`: zero-pads q, k, v to head_dim N (softmax scale of the TRUE head_dim; the zero columns
    add nothing to q.k, and the padded output columns are sliced off), and fails likewise;
  - `auto`: the true head_dim when a fast kernel takes it, else the next multiple of 8, else
    the next power of two.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from titanlite.config import Config, ConfigError
from titanlite.config import Model as ModelConfig

logger = logging.getLogger("titanlite")

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
FAST_BACKENDS = ("flash", "efficient", "cudnn")
# aten ops each SDPA backend dispatches to (CUDA and CPU names); the math kernel is a plain decomposition.
_KERNEL_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
               "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_fused_attention_overrideable": "fused"}

AttentionFn = Callable[..., torch.Tensor]


def pad_head_dim(attention_fn: AttentionFn, padded_head_dim: int) -> AttentionFn:
    """`attention_fn` run on q, k, v zero-padded to `padded_head_dim`, output cut back.

    Exact: the zero columns add 0 to every q.k, and the padded columns of the output are
    softmax-weighted sums of zeros. The scale must be the true head_dim's (SDPA's default would
    take the padded one), so a None scale becomes 1/sqrt(true head_dim) here.
    """
    def padded_attention(q, k, v, scale, mask=None):
        head_dim = q.shape[-1]
        if head_dim == padded_head_dim:
            return attention_fn(q, k, v, scale, mask)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        pad = (0, padded_head_dim - head_dim)
        out = attention_fn(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale, mask)
        return out[..., :head_dim]

    padded_attention.padded_head_dim = padded_head_dim
    return padded_attention


class _KernelRecorder(TorchDispatchMode):
    """Records which fused attention kernels the dispatcher reaches."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        for prefix, kernel in _KERNEL_OPS.items():
            if name.startswith(prefix) and "backward" not in name:
                self.kernels.append(kernel)
        return func(*args, **(kwargs or {}))


def _trial(attention_fn, q_heads, kv_heads, head_dim, dtype, device, seq_len, scale) -> None:
    shapes = ((1, q_heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim))
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for shape in shapes)
    attention_fn(q, k, v, scale).sum().backward()


def selected_kernel(attention_fn: AttentionFn, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device | str, seq_len: int = 128, scale: float | None = None) -> str:
    """The kernel the default dispatch picks for this call: flash | efficient | cudnn | fused | math."""
    recorder = _KernelRecorder()
    with warnings.catch_warnings(), recorder:
        warnings.simplefilter("ignore")
        _trial(attention_fn, q_heads, kv_heads, head_dim, dtype, device, seq_len, scale)
    return recorder.kernels[0] if recorder.kernels else "math"


def accepting_backends(attention_fn: AttentionFn, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device | str, seq_len: int = 128, scale: float | None = None) -> dict[str, bool]:
    """For each SDPA backend, whether it runs this call (forward and backward) when it is the only one allowed."""
    accepted = {}
    for name, backend in BACKENDS.items():
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")  # "X kernel not used because ...": we report it ourselves
                _trial(attention_fn, q_heads, kv_heads, head_dim, dtype, device, seq_len, scale)
            accepted[name] = True
        except RuntimeError:
            accepted[name] = False
    return accepted


def padding_candidates(head_dim: int, setting: str) -> list[int]:
    """Head dims to try, in order, for a `model.attention_head_dim_padding` setting."""
    if setting == "none":
        return [head_dim]
    if setting != "auto":
        return [int(setting)]
    multiple_of_8 = -(-head_dim // 8) * 8
    power_of_2 = 1 << (head_dim - 1).bit_length()
    # The power of two before the multiple of 8: on H100 (torch 2.11) head_dim 100 padded to 128
    # ran 1.05x faster than padded to 104 (bench/results/2026-11-27_attention_h100.json).
    return list(dict.fromkeys([head_dim, power_of_2, multiple_of_8]))


# Fastest first, measured on H100 with torch 2.11 for the recipes' causal GQA attention:
# cuDNN ran 1.7x faster than flash at head_dim 128 and at 100 padded to 128
# (bench/results/2026-11-27_sdpa_backends_h100.json, 2026-11-27_attention_h100.json).
KERNEL_PREFERENCE = ("cudnn", "flash", "efficient")


def resolve_attention_head_dim_padding(config: ModelConfig, tensor_parallel_degree: int, dtype: torch.dtype,
                                       device: torch.device, attention_fn: AttentionFn | None = None) -> str:
    """The concrete padding ("none" or "N") whose attention runs on a fast kernel; logs the kernel.

    Raises ConfigError when no candidate reaches a fast kernel: never a silent math fallback.
    Call once at start-up, before building the model, on the device and dtype of training.
    """
    if attention_fn is None:
        from titanlite.model import sdpa_causal  # the model's own call (model.py imports this module)

        attention_fn = sdpa_causal
    head_dim = config.dim // config.n_heads
    q_heads = max(1, config.n_heads // tensor_parallel_degree)  # heads on one TP rank
    kv_heads = max(1, config.n_kv_heads // tensor_parallel_degree)
    scale = 1.0 / math.sqrt(head_dim)
    tried, fast = [], []
    for padded in padding_candidates(head_dim, config.attention_head_dim_padding):
        fn = attention_fn if padded == head_dim else pad_head_dim(attention_fn, padded)
        kernel = selected_kernel(fn, q_heads, kv_heads, head_dim, dtype, device, scale=scale)
        tried.append(f"head_dim {padded} -> {kernel}")
        if kernel != "math":  # kernels outside KERNEL_PREFERENCE (e.g. "fused") rank last
            rank = KERNEL_PREFERENCE.index(kernel) if kernel in KERNEL_PREFERENCE else len(KERNEL_PREFERENCE)
            fast.append((rank, len(fast), padded, kernel))
    if fast:  # the fastest kernel wins; among equals, the earlier candidate
        _, _, padded, kernel = min(fast)
        logger.info("attention: head_dim %d%s runs on the SDPA %s kernel (%s, %s; tried %s)", head_dim,
                    "" if padded == head_dim else f" zero-padded to {padded}", kernel, dtype, device.type,
                    "; ".join(tried))
        return "none" if padded == head_dim else str(padded)
    accepted = accepting_backends(attention_fn, q_heads, kv_heads, head_dim, dtype, device, scale=scale)
    raise ConfigError(
        f"attention: no fast SDPA kernel takes head_dim {head_dim} in {dtype} on {device.type} "
        f"({'; '.join(tried)}; backends accepting the true shape: {[k for k, ok in accepted.items() if ok]}): "
        "the math kernel would run silently (quadratic memory, many times slower); set "
        "model.attention_head_dim_padding=auto or a multiple of 8, or training.mixed_precision=bf16")


def check_attention_kernel(config: Config, device: torch.device) -> None:
    """Start-up check on CUDA: resolve model.attention_head_dim_padding in place, or raise ConfigError."""
    if device.type != "cuda" or config.model.attention != "sdpa":
        if config.model.attention_head_dim_padding == "auto":
            config.model.attention_head_dim_padding = "none"
        return  # CPU runs are for tests and debugging; FlexAttention fails loudly by itself
    dtype = torch.bfloat16 if config.training.mixed_precision == "bf16" else torch.float32
    config.model.attention_head_dim_padding = resolve_attention_head_dim_padding(
        config.model, config.parallelism.tensor_parallel_degree, dtype, device)

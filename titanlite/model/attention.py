"""Attention kernels: SDPA causal, FlexAttention with a document mask, head-dim padding, the start-up probe.

Every attention function takes q (batch, heads, seq, head_dim), k and v (batch, kv_heads, seq,
head_dim), the softmax scale (None = 1/sqrt(head_dim)) and a mask, and returns q's shape; K/V
heads broadcast over query groups (GQA).

  - `sdpa_causal` (model.attention = "sdpa"): causal attention over the whole packed row, so a
    token also attends to the documents before it in the row; the fastest kernels take it.
  - `flex_document_attention` (model.attention = "flex"): token q attends to token k only if
    k <= q and both belong to the same document. `document_mask(document_ids)` turns the loader's
    document ids into a FlexAttention BlockMask once per micro-batch, shared by every layer.
    FlexAttention is fast only compiled: on CUDA it calls a compiled `flex_attention`; on CPU
    (tests) it runs eagerly, and where gradients are needed (no CPU backward) the same mask,
    materialized, goes through SDPA.

Where no fast SDPA kernel (flash, memory-efficient, cuDNN) accepts a shape, PyTorch runs the math
kernel without a word: it materializes the (seq x seq) scores, quadratic in memory and many times
slower. The 3B recipe has head_dim 100 (3200 / 32). So `choose_attention_head_dim` runs the
model's exact attention call (dtype, device, GQA ratio, causal, scale) on a tiny input at
start-up, records which aten kernel ran, and returns the head dim to run at: the true one, or a
zero-padded one (`pad_head_dim`) when that reaches a faster kernel; it raises when only the math
kernel is left.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import (BlockMask, create_block_mask, create_mask, flex_attention)
from torch.utils._python_dispatch import TorchDispatchMode

from titanlite.config.settings import ConfigError
from titanlite.config.settings import Model as ModelConfig

logger = logging.getLogger("titanlite")

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# Fastest first, measured on H100 with torch 2.11 for the recipes' causal GQA attention: cuDNN ran
# 1.7x faster than flash at head_dim 128 and at 100 padded to 128
# (bench/results/2026-11-27_sdpa_backends_h100.json, 2026-11-27_attention_h100.json).
KERNEL_PREFERENCE = ("cudnn", "flash", "efficient")
# aten ops each SDPA backend dispatches to (CUDA and CPU names); the math kernel is a plain decomposition.
_KERNEL_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
               "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_fused_attention_overrideable": "fused"}


# --- the attention functions

def sdpa_causal(q, k, v, scale, mask=None):
    """Causal attention over the whole row (mask is ignored: there is none to apply)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def document_mask(document_ids: torch.Tensor) -> BlockMask:
    """document_ids (batch, seq) int64 on the model's device -> BlockMask (batch, all heads, seq, seq).

    Blocks entirely outside every document are skipped by the kernel.
    """
    def same_document_causal(batch, head, q_index, kv_index):
        return (document_ids[batch, q_index] == document_ids[batch, kv_index]) & (kv_index <= q_index)

    batch, seq = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, seq, seq, device=document_ids.device)


@functools.cache
def _compiled_flex_attention():
    # FlexAttention's fused kernel only exists through torch.compile: compile it once per process.
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q, k, v, scale, mask: BlockMask | None = None):
    """Attention within documents (`mask` from `document_mask`); mask=None is plain causal."""
    if mask is None:
        return sdpa_causal(q, k, v, scale)
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and q.requires_grad:
            dense = create_mask(mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=True)
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)


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
        return attention_fn(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale, mask)[..., :head_dim]

    return padded_attention


def build_attention(config: ModelConfig) -> AttentionFn:
    """The attention function of a model config (model.attention, padded to model.attention_head_dim)."""
    attention_fn = flex_document_attention if config.attention == "flex" else sdpa_causal
    head_dim = config.dim // config.n_heads
    if config.attention_head_dim > head_dim:
        return pad_head_dim(attention_fn, config.attention_head_dim)
    return attention_fn


# --- which kernel runs

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
                warnings.simplefilter("ignore")  # "X kernel not used because ...": reported by the caller
                _trial(attention_fn, q_heads, kv_heads, head_dim, dtype, device, seq_len, scale)
            accepted[name] = True
        except RuntimeError:
            accepted[name] = False
    return accepted


def head_dim_candidates(head_dim: int, setting: int) -> list[int]:
    """Head dims to try, in order, for model.attention_head_dim (0 = auto)."""
    if setting:
        return [setting]
    multiple_of_8 = -(-head_dim // 8) * 8
    power_of_2 = 1 << (head_dim - 1).bit_length()
    # The power of two before the multiple of 8: on H100 (torch 2.11) head_dim 100 padded to 128
    # ran 1.05x faster than padded to 104 (bench/results/2026-11-27_attention_h100.json).
    return list(dict.fromkeys([head_dim, power_of_2, multiple_of_8]))


def choose_attention_head_dim(config: ModelConfig, tensor_parallel_degree: int, dtype: torch.dtype,
                              device: torch.device) -> int:
    """The head dim attention runs at (model.attention_head_dim, resolved). Call once at start-up.

    Probes SDPA on CUDA only: CPU runs are for tests and debugging, and FlexAttention fails loudly
    by itself; elsewhere it is the configured head dim (0 = the true one).
    """
    if device.type != "cuda" or config.attention != "sdpa":
        return config.attention_head_dim or config.dim // config.n_heads
    return probe_attention_head_dim(config, tensor_parallel_degree, dtype, device)


def probe_attention_head_dim(config: ModelConfig, tensor_parallel_degree: int, dtype: torch.dtype,
                             device: torch.device, attention_fn: AttentionFn = sdpa_causal) -> int:
    """The candidate head dim whose `attention_fn` reaches the fastest kernel on `device`; logs it.

    Raises ConfigError when no candidate reaches a fast kernel: never a silent math fallback.
    """
    head_dim = config.dim // config.n_heads
    q_heads = max(1, config.n_heads // tensor_parallel_degree)  # heads on one TP rank
    kv_heads = max(1, config.n_kv_heads // tensor_parallel_degree)
    scale = 1.0 / math.sqrt(head_dim)
    tried, fast = [], []
    for padded in head_dim_candidates(head_dim, config.attention_head_dim):
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
        return padded
    accepted = accepting_backends(attention_fn, q_heads, kv_heads, head_dim, dtype, device, scale=scale)
    raise ConfigError(
        f"attention: no fast SDPA kernel takes head_dim {head_dim} in {dtype} on {device.type} "
        f"({'; '.join(tried)}; backends accepting the true shape: {[k for k, ok in accepted.items() if ok]}): "
        "the math kernel would run silently (quadratic memory, many times slower); set "
        "model.attention_head_dim=0 (auto) or a multiple of 8, or training.mixed_precision=bf16")

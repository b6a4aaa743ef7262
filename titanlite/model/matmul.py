"""acc + a @ b with the sum kept wider than the operands: the weight gradients' accumulation."""

from __future__ import annotations

import torch


def accumulate_matmul(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """acc + a @ b in `dtype` (acc None: a @ b), written into acc when given.

    For bf16 a and b and an fp32 dtype, cuBLAS adds the product into the fp32 sum (beta = 1, fp32
    output): no bf16 rounding of each product and no separate add pass. Off CUDA (out_dtype matmuls
    are CUDA-only) the same numbers come from the operands widened to `dtype`.
    """
    if a.dtype != dtype and a.device.type != "cuda":
        a, b = a.to(dtype), b.to(dtype)
    if a.dtype == dtype:
        return a @ b if acc is None else acc.addmm_(a, b)
    if acc is None:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.addmm(acc, a, b, out_dtype=dtype, out=acc)

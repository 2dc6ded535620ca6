"""W4A4 integer kernels: packed INT4 weights and activations, per-group scales, INT32 dots.

``w4a4_linear`` is the entry point: Triton on CUDA tensors, integer CPU code otherwise, both checked
against the PyTorch reference in :mod:`tca_lightning.kernels.reference`. Triton is imported only when
a Triton function is asked for, so this package imports (and runs on CPU) without it.
"""

from __future__ import annotations

import torch

from tca_lightning.kernels.cpu import group_partials_cpu, w4a4_gemm_cpu
from tca_lightning.kernels.reference import (
    group_int_partials,
    pack_weight_codes,
    quantize_act_int4,
    quantize_weight_int4,
    w4a4_gemm_reference,
)

_TRITON_EXPORTS = ("quantize_act_int4_triton", "w4a4_gemm_triton", "w4a4_linear_triton")

__all__ = ["group_int_partials", "group_partials_cpu", "pack_weight_codes", "quantize_act_int4",
           "quantize_weight_int4", "w4a4_gemm_cpu", "w4a4_gemm_reference", "w4a4_linear", *_TRITON_EXPORTS]


def __getattr__(name: str):
    """Lazy access to the Triton functions (PEP 562): importing triton is deferred until needed."""
    if name in _TRITON_EXPORTS:
        from tca_lightning.kernels import triton_w4a4

        return getattr(triton_w4a4, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def infer_group_size(w_packed: torch.Tensor, w_scale: torch.Tensor) -> int:
    """G = K / (number of scale columns), K = 2 x packed columns."""
    k, groups = 2 * w_packed.shape[-1], w_scale.shape[-1]
    if groups == 0 or k % groups:
        raise ValueError(f"cannot infer group_size: K = {k} is not a multiple of the {groups} scale columns")
    return k // groups


def w4a4_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                group_size: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x W^T + b with dynamic INT4 activations and packed INT4 weights; x is (..., K), y is (..., N).

    ``group_size`` defaults to what the weight's scales imply; ``out_dtype`` to ``x.dtype``.
    """
    if x.dim() == 0:
        raise ValueError("x must have shape (..., K), got a scalar")
    group_size = infer_group_size(w_packed, w_scale) if group_size is None else group_size
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        from tca_lightning.kernels.triton_w4a4 import w4a4_linear_triton

        y = w4a4_linear_triton(x2, w_packed, w_scale, bias, group_size, out_dtype)
    else:
        a_packed, a_scale = quantize_act_int4(x2, group_size)
        y = w4a4_gemm_cpu(a_packed, a_scale, w_packed, w_scale, group_size, bias, out_dtype)
    return y.reshape(*x.shape[:-1], w_packed.shape[0])

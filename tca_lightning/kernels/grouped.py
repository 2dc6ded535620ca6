"""Integer group GEMMs beyond symmetric W4A4: 8-bit codes (W8A8, W4A8) and asymmetric activations.

The W4A4 kernels (``w4a4_linear``) take symmetric INT4 on both sides. The recipes also quantize
the embedders and the final layer to W8A8, and the default recipe's activations are *asymmetric*
(``QuantRecipe.act_symmetric=False``: post-GELU and adaLN-modulated inputs are skewed). This module
covers both with integer dots:

- activation codes for any width b <= 8: the formulas of ``quant.quantizers`` (choose_qparams,
  quantize), so they equal the fake quant's codes; asymmetric codes q in [0, 2^b) are stored
  shifted, q' = q - 2^(b-1), so they fit signed int8/int4 like symmetric ones, and the zero point
  shifts with them (z' = z - 2^(b-1)): the dequantized value (q - z) s = (q' - z') s is unchanged;
- the group GEMM on int8 codes: exact per-group integer dots P[g, m, n] (int32 batched matmul on
  CPU; on CUDA a float32 batched matmul of the codes, exact while 128 * 128 * G < 2^24, i.e.
  G <= 1024, else float64), then the FP32 epilogue of the W4A4 reference (``scale_and_sum``);
- the zero point as a correction term: sum_k (q'_k - z') s w_k ws = s ws (P - z' S) per group,
  S[n, g] the sum of row n's weight codes in group g (fixed, precomputed), so
  y = GEMM(P) - (s z') @ (ws S)^T, a small (M, K/G) x (K/G, N) float product after the integer GEMM.
"""

from __future__ import annotations

import torch

from tca_lightning.kernels.reference import quantize_act_codes, scale_and_sum  # noqa: F401 (re-exported)
from tca_lightning.quant.quantizers import to_groups

FP32_EXACT_GROUP = 1024  # 128 * 128 * G < 2^24: every partial sum of products of int8 codes is exact in FP32


def group_code_sums(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """S[n, g] = sum of row n's integer codes in group g, as FP32 (exact: |S| <= 128 G)."""
    return to_groups(codes.to(torch.int32), group_size, "weight codes").sum(-1).float()


def group_partials_int8(a_codes: torch.Tensor, w_codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact per-group dots of int8 codes, int32 (K/G, M, N)."""
    for name, t in (("activation codes", a_codes), ("weight codes", w_codes)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name} must be 2-D int8, got {t.dtype} of shape {tuple(t.shape)}")
    if a_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(f"activation and weight codes disagree on K: {a_codes.shape[1]} vs {w_codes.shape[1]}")
    m, n = a_codes.shape[0], w_codes.shape[0]
    if a_codes.is_cuda:  # no integer bmm on CUDA: float codes, exact for G <= 1024 in FP32
        dtype = torch.float32 if group_size <= FP32_EXACT_GROUP else torch.float64
        a = to_groups(a_codes.to(dtype), group_size).transpose(0, 1)
        w = to_groups(w_codes.to(dtype), group_size).permute(1, 2, 0)
        return torch.bmm(a, w).round_().to(torch.int32)
    a = to_groups(a_codes.to(torch.int32), group_size, "activation codes").transpose(0, 1)  # (K/G, M, G)
    w = to_groups(w_codes.to(torch.int32), group_size, "weight codes").permute(1, 2, 0).contiguous()  # (K/G, G, N)
    return torch.bmm(a, w).reshape(-1, m, n)


def int8_group_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[m, n] = sum_g P[g, m, n] a_scale[m, g] w_scale[n, g] (+ bias[n]): the W4A4 contract on int8 codes."""
    groups = a_codes.shape[1] // group_size
    for name, s, rows in (("a_scale", a_scale, a_codes.shape[0]), ("w_scale", w_scale, w_codes.shape[0])):
        if tuple(s.shape) != (rows, groups):
            raise ValueError(f"{name} must have shape {(rows, groups)} (rows, K/G), got {tuple(s.shape)}")
    return scale_and_sum(group_partials_int8(a_codes, w_codes, group_size), a_scale, w_scale, bias, out_dtype)


def zero_point_correction(a_scale: torch.Tensor, a_zero: torch.Tensor, w_scale: torch.Tensor,
                          w_code_sums: torch.Tensor) -> torch.Tensor:
    """sum_g a_scale[m, g] a_zero[m, g] w_scale[n, g] S[n, g], (M, N) FP32: subtract it from the GEMM."""
    return (a_scale.float() * a_zero.float()) @ (w_scale.float() * w_code_sums.float()).t()


def expand_groups(scale: torch.Tensor, factor: int) -> torch.Tensor:
    """Per-group values (rows, K/G) -> (rows, K/(G/factor)): each value repeated over its sub-groups."""
    return scale if factor == 1 else scale.repeat_interleave(factor, dim=-1)

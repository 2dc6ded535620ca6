"""Triton W4A4 kernels: fused activation quantize+pack, and the packed INT4 group GEMM.

Same numbers as ``tca_lightning.kernels.reference`` (tests/test_kernels.py checks them under
``TRITON_INTERPRET=1``): the quantize kernel writes the same bytes and FP32 scales as
``quantize_act_int4``, the GEMM the same per-group int32 dots; only the FP32 epilogue may differ in
the last bits on a GPU (the compiler may fuse its multiply-add).

The GEMM (Hopper has no INT4 MMA, so INT4 is unpacked to INT8 for ``tl.dot``): one program per
(BLOCK_M, BLOCK_N) output tile loops over the K/G groups; per group it loads the packed (BLOCK_M, G/2)
activation and (BLOCK_N, G/2) weight bytes, sign-extends the low and high nibbles into two int8
halves (split-half layout, see ``tca_lightning.quant.packing``), takes an int32 dot per half and
adds ``P_g * a_scale[:, g] * w_scale[:, g]`` to an FP32 accumulator. Nothing integer or dequantized
ever reaches global memory. An int8 ``tl.dot`` needs an inner dim >= 32 on NVIDIA (Triton's
``min_dot_size``), so for G = 32 the halves are joined back into one (rows, 32) operand: the order
of channels inside a dot does not matter as long as both operands use the same one.

Rounding is round-half-to-even like ``torch.round``, built from floor and compares (exact in any IEEE
FP32, no libdevice: the interpreter has no extern calls); divisions are ``div_rn`` (IEEE), as
torch's are, because a GPU's default FP32 division is approximate.

Plain pointer arithmetic only (no ``make_block_ptr``: gone in Triton 3.9); no autotuning (it fails
under the interpreter): block sizes are arguments with GPU-sane defaults. No ``tl.max``/``tl.zeros``
(or other ``triton.language.standard`` helpers) inside the kernels: those are ``@triton.jit``
functions themselves, built when triton is first imported, so if that happened before
``TRITON_INTERPRET=1`` was set (as in a pytest session that imported the package earlier) the
interpreter refuses to call them. ``tl.reduce`` with our own combine function and ``tl.full`` are
builtins and work either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tca_lightning.kernels.reference import check_operands
from tca_lightning.quant.packing import check_group_size

FP32_TINY = torch.finfo(torch.float32).tiny  # choose_qparams' floor on the scale
MIN_GROUP = 32


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _round_half_even_clamp(y):
    """int32 codes of clamp(round_half_even(y), -8, 7), exact for |y| < 2^23."""
    a = tl.abs(y)
    t = tl.floor(a)
    frac = a - t  # exact: t <= a < t + 1
    ti = t.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((ti & 1) == 1))
    r = ti + up.to(tl.int32)
    q = tl.where(y < 0, -r, r)
    return tl.minimum(tl.maximum(q, -8), 7)


@triton.jit
def _act_quant_pack_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, stride_qm, stride_sm,
                           HALF: tl.constexpr, BLOCK_M: tl.constexpr, TINY: tl.constexpr):
    """One program: BLOCK_M tokens x one group -> packed bytes and one FP32 scale per token."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, HALF)
    mask = (rm < M)[:, None]
    x_lo_ptrs = x_ptr + rm[:, None] * stride_xm + g * 2 * HALF + rk[None, :]
    lo = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(x_lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.reduce(tl.maximum(tl.abs(lo), tl.abs(hi)), 1, _max_combine)
    scale = tl.maximum(tl.math.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32)), TINY)
    q_lo = _round_half_even_clamp(tl.math.div_rn(lo, scale[:, None]))
    q_hi = _round_half_even_clamp(tl.math.div_rn(hi, scale[:, None]))
    byte = (q_lo & 0xF) | ((q_hi & 0xF) << 4)
    tl.store(q_ptr + rm[:, None] * stride_qm + g * HALF + rk[None, :], byte.to(tl.uint8), mask=mask)
    tl.store(s_ptr + rm * stride_sm + g, scale, mask=rm < M)


@triton.jit
def _unpack_halves(packed):
    """uint8 split-half bytes -> (low-nibble int8, high-nibble int8), sign-extended."""
    v = packed.to(tl.int32)
    lo = (v << 28) >> 28  # arithmetic shift sign-extends bit 3
    hi = (v << 24) >> 28
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def _w4a4_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, GROUPS,
                      stride_am, stride_asm, stride_wn, stride_wsn, stride_om,
                      HALF: tl.constexpr, JOIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, HALF)
    mask_m = rm < M
    mask_n = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for g in range(0, GROUPS):
        a_lo, a_hi = _unpack_halves(tl.load(a_ptrs, mask=mask_m[:, None], other=0))
        w_lo, w_hi = _unpack_halves(tl.load(w_ptrs, mask=mask_n[:, None], other=0))
        if JOIN:
            a = tl.reshape(tl.join(a_lo, a_hi), (BLOCK_M, 2 * HALF))
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, 2 * HALF))
            part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        else:
            part = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
            part = tl.dot(a_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
        sa = tl.load(as_ptr + rm * stride_asm + g, mask=mask_m, other=0.0).to(tl.float32)
        sw = tl.load(ws_ptr + rn * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += part.to(tl.float32) * sa[:, None] * sw[None, :]
        a_ptrs += HALF
        w_ptrs += HALF
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check_triton_group(group_size: int) -> None:
    if group_size < MIN_GROUP or group_size & (group_size - 1):
        raise ValueError(f"the Triton W4A4 kernels take power-of-two group sizes >= {MIN_GROUP} "
                         f"(tl.arange and the int8 dot need them), got {group_size}")


def quantize_act_int4_triton(x: torch.Tensor, group_size: int, block_m: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``quantize_act_int4``: (M, K) -> (packed uint8 (M, K/2), FP32 scale (M, K/G))."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a 2-D float tensor, got {x.dtype} of shape {tuple(x.shape)}")
    _check_triton_group(group_size)
    m, k = x.shape
    check_group_size(k, group_size, "activation's in_features")
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = k // group_size
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(m, block_m), groups)
        _act_quant_pack_kernel[grid](x, packed, scale, m, x.stride(0), packed.stride(0), scale.stride(0),
                                     HALF=group_size // 2, BLOCK_M=block_m, TINY=FP32_TINY)
    return packed, scale


def w4a4_gemm_triton(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                     group_size: int, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                     block_m: int = 64, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Triton twin of ``w4a4_gemm_reference``: (M, N) in ``out_dtype``."""
    m, n, groups = check_operands(a_packed, a_scale, w_packed, w_scale, group_size, bias)
    _check_triton_group(group_size)
    a_packed, w_packed = a_packed.contiguous(), w_packed.contiguous()
    a_scale, w_scale = a_scale.contiguous(), w_scale.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a_packed.device)
    if m and n:
        half = group_size // 2
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _w4a4_gemm_kernel[grid](a_packed, a_scale, w_packed, w_scale, bias if bias is not None else out, out,
                                m, n, groups, a_packed.stride(0), a_scale.stride(0), w_packed.stride(0),
                                w_scale.stride(0), out.stride(0),
                                HALF=half, JOIN=half < 32, HAS_BIAS=bias is not None,
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out


def w4a4_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       group_size: int, out_dtype: torch.dtype | None = None, **gemm_options) -> torch.Tensor:
    """y = x W^T + b with W4A4: quantize+pack x per token per group, then the group GEMM. x is (M, K)."""
    a_packed, a_scale = quantize_act_int4_triton(x, group_size)
    return w4a4_gemm_triton(a_packed, a_scale, w_packed, w_scale, group_size, bias,
                            out_dtype if out_dtype is not None else x.dtype, **gemm_options)

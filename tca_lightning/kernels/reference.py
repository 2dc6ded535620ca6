"""The W4A4 group GEMM in plain PyTorch: the spec the CPU and Triton kernels are tested against.

Quantization (the formulas of ``tca_lightning.quant.quantizers``, reused, not re-derived):
- weights: symmetric INT4 per group of G input channels, one FP16 scale per (row, group); the codes
  are computed with the FP16-rounded scale, so ``codes * scale`` is exactly what the checkpoint holds;
- activations: dynamic, symmetric INT4 per token per group, FP32 scales, the same numbers as
  ``fake_quant(x, QuantSpec(bits=4, granularity="group", group_size=G))``, so the fake-quant
  calibration and the integer inference agree code for code.
Both are packed with :func:`tca_lightning.quant.packing.pack_int4` (split-half layout).

The GEMM: per group g an exact integer dot ``P[g, m, n] = sum_{k in g} a[m, k] w[n, k]``, then in
FP32, group by group in order, ``out += (P[g] * a_scale[:, g]) * w_scale[:, g]``, then ``+ bias``, then
a cast to ``out_dtype``. |P| <= 64 G, so every integer is exact in int16/int32/FP32 for G < 512.
"""

from __future__ import annotations

import torch

from tca_lightning.quant.packing import check_group_size, pack_int4, unpack_int4
from tca_lightning.quant.quantizers import FP16_MIN_SUBNORMAL, QuantSpec, choose_qparams, quantize


def int4_group_spec(group_size: int) -> QuantSpec:
    """The 4-bit symmetric per-group spec shared by weights and activations."""
    return QuantSpec(bits=4, symmetric=True, granularity="group", group_size=group_size)


def _require_2d_float(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}: flatten leading dims first")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN or Inf entries: they have no INT4 code")


def _to_fp16_scale(scale: torch.Tensor, name: str) -> torch.Tensor:
    """FP32 scales -> FP16, floored at FP16's smallest subnormal so no scale rounds to 0."""
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError(f"{name} scales exceed FP16's range (|w| > ~4.6e5 in a group): rescale the layer first")
    return scale.clamp_min(FP16_MIN_SUBNORMAL).to(torch.float16)


def quantize_weight_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (packed uint8 (N, K/2), FP16 scale (N, K/G)), round to nearest."""
    _require_2d_float(w, "weight")
    check_group_size(w.shape[1], group_size, "weight's in_features")
    spec = int4_group_spec(group_size)
    w32 = w.detach().float()
    scale, zero = choose_qparams(w32, spec, name="weight")
    scale16 = _to_fp16_scale(scale, "weight")
    codes = quantize(w32, scale16.float(), zero, spec, name="weight")
    return pack_int4(codes.to(torch.int8).reshape(w.shape), group_size), scale16.squeeze(-1)


def pack_weight_codes(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed integer codes (N, K) and scales (N, K/G) (e.g. GPTQ's grid) -> (packed, FP16 scale).

    ``scale`` may carry choose_qparams' trailing keepdim axis, (N, K/G, 1). Its FP16 rounding is what
    dequantization then uses: quantize against the FP16 scale if that rounding matters to you.
    """
    if codes.dim() != 2:
        raise ValueError(f"weight codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    check_group_size(k, group_size, "weight's in_features")
    if scale.dim() == 3 and scale.shape[-1] == 1:
        scale = scale.squeeze(-1)
    if tuple(scale.shape) != (n, k // group_size):
        raise ValueError(f"weight scale must have shape (N, K/G) = {(n, k // group_size)}, got {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("weight scales must be finite and non-negative")
    packed = pack_int4(codes, group_size)
    scale32 = scale.detach().float()
    if bool((scale32 > torch.finfo(torch.float16).max).any()):
        raise ValueError("weight scales exceed FP16's range: rescale the layer first")
    return packed, scale32.to(torch.float16)


def quantize_act_codes(x: torch.Tensor, bits: int, symmetric: bool,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(M, K) float -> (signed int8 codes (M, K), FP32 scale (M, K/G), zero point (M, K/G) or None).

    Dynamic per token per group, computed in FP32; asymmetric codes and zero points come shifted by
    2^(bits-1) (see tca_lightning.kernels.grouped), symmetric ones have no zero point.
    """
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D (tokens, in_features), got shape {tuple(x.shape)}")
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
    x32 = x.detach().float()
    scale, zero = choose_qparams(x32, spec, name="activation")
    codes = quantize(x32, scale, zero, spec, name="activation")
    if symmetric:
        return codes.to(torch.int8).reshape(x.shape), scale.squeeze(-1), None
    shift = 2 ** (bits - 1)
    return (codes - shift).to(torch.int8).reshape(x.shape), scale.squeeze(-1), (zero - shift).squeeze(-1)


def quantize_act_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (packed uint8 (M, K/2), FP32 scale (M, K/G)), dynamic per token per group:
    the symmetric 4-bit codes of :func:`quantize_act_codes`, packed."""
    _require_2d_float(x, "activation")
    check_group_size(x.shape[1], group_size, "activation's in_features")
    codes, scale, _ = quantize_act_codes(x, 4, True, group_size)
    return pack_int4(codes, group_size), scale


def check_operands(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                   group_size: int, bias: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Validate the GEMM operands' dtypes and shapes; return (M, N, number of groups)."""
    for name, t in (("a_packed", a_packed), ("w_packed", w_packed)):
        if t.dtype != torch.uint8 or t.dim() != 2:
            raise ValueError(f"{name} must be 2-D uint8 (packed int4), got {t.dtype} of shape {tuple(t.shape)}")
    (m, half_k), (n, half_kw) = a_packed.shape, w_packed.shape
    if half_k != half_kw:
        raise ValueError(f"activation and weight disagree on K: {2 * half_k} vs {2 * half_kw}")
    if half_k == 0:
        raise ValueError("in_features K must be positive")
    check_group_size(2 * half_k, group_size, "in_features K")
    groups = 2 * half_k // group_size
    for name, s, rows in (("a_scale", a_scale, m), ("w_scale", w_scale, n)):
        if tuple(s.shape) != (rows, groups) or not s.dtype.is_floating_point:
            raise ValueError(f"{name} must be float of shape {(rows, groups)} (rows, K/G), "
                             f"got {s.dtype} of shape {tuple(s.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return m, n, groups


def group_int_partials(a_packed: torch.Tensor, w_packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact per-group integer dot products, int32 (K/G, M, N)."""
    m, n = a_packed.shape[0], w_packed.shape[0]
    a = unpack_int4(a_packed, group_size).to(torch.int32).reshape(m, -1, group_size).transpose(0, 1)
    w = unpack_int4(w_packed, group_size).to(torch.int32).reshape(n, -1, group_size).permute(1, 2, 0)
    return torch.bmm(a, w)


def scale_and_sum(partials: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The FP32 epilogue: sum_g (P[g] * a_scale[:, g]) * w_scale[:, g] in group order, + bias, cast."""
    a_s, w_s = a_scale.float(), w_scale.float()
    out = partials[0].float().mul_(a_s[:, 0, None]).mul_(w_s[None, :, 0])
    for g in range(1, partials.shape[0]):
        out.add_(partials[g].float().mul_(a_s[:, g, None]).mul_(w_s[None, :, g]))
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


def w4a4_gemm_reference(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                        group_size: int, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[m, n] = sum_g P[g, m, n] a_scale[m, g] w_scale[n, g] (+ bias[n]), (M, N) in ``out_dtype``."""
    check_operands(a_packed, a_scale, w_packed, w_scale, group_size, bias)
    return scale_and_sum(group_int_partials(a_packed, w_packed, group_size), a_scale, w_scale, bias, out_dtype)

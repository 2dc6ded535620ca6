"""Exact integer GEMMs on CPU through oneDNN's int8 matmul, for layers whose scales factor out of one GEMM.

With weights quantized per output channel (scale ws[n]) and activations per token (scale s[m], zero
point z[m]), the group sum of the group kernels collapses to one integer GEMM:

    y[m, n] = s[m] ws[n] (P[m, n] - z[m] S[n]) + b[n],   P = codes_a @ codes_w^T (exact int32),

S[n] the sum of row n's weight codes. P runs on ``torch.ops.onednn.qlinear_pointwise`` (u8 activations
x s8 weights -> int32 accumulators; FP32 output scaled by ws[n] inside the kernel), the weight
prepacked once by ``torch.ops.onednn.qlinear_prepack``. The per-token scale, the zero-point term and
the bias are applied after it in FP32. Activation codes are the fake quant's (``quantize_act_codes``
with one group of K), stored shifted to signed like the group kernels'; the kernel gets them as u8,
u = q' + 2^(b-1), with its scalar zero point 2^(b-1), so its int32 sum is exactly sum q' w.

Exactness on CPUs without VNNI/AMX (AVX2: this repo's 2-core AMD EPYC): oneDNN's u8 x s8 kernels add
two adjacent products into int16 *with saturation* (vpmaddubsw), so the int32 sum is exact only if
umax * 2 * max|w| <= 32767 (measured: u = 255 with w = 64 exact, w = 65 not). 4-bit activations, or
any weights with <= 7-bit activations, pass in one GEMM. 8-bit activations with |w| > 64 (W8A8) do
not: the weight is split, w = floor(w/2) + ceil(w/2) (both halves in [-64, 64]), and the GEMM runs
on [u, u] x [w_lo, w_hi] (K doubled, one int32 accumulator: still exact, twice the work).

Measured (torch 2.13 CPU, 2 threads, AMD EPYC AVX2, M = 1024, K = N = 1152, medians of 5): FP32
F.linear 28 ms, this GEMM one pass 10.5-11.5 ms, K doubled 22 ms; benchmarks/cpu_latency.py has the
layer shapes of DiT-XL/2 with activation quantization included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tca_lightning.kernels.reference import quantize_act_codes

INT16_MAX = 32767  # a vpmaddubsw pair sum saturates above this
INT32_MAX = 2**31 - 1


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized matmul ops (x86 CPU builds do)."""
    ops = getattr(torch.ops, "onednn", None)
    try:
        return torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qlinear_pointwise") \
            and hasattr(ops, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class OnednnWeight:
    """A prepacked weight: the opaque oneDNN tensor plus what the epilogue needs."""

    packed: torch.Tensor
    """oneDNN's prepacked int8 weight, (K, N) or (2K, N) when split."""
    scale: torch.Tensor
    """FP32 (N,) per-output-channel scale, applied inside the kernel."""
    code_sums: torch.Tensor
    """FP32 (N,) ws[n] * S[n]: the zero-point term's weight side."""
    in_features: int
    out_features: int
    act_bits: int
    split: bool
    """True: the weight was split in two halves (K doubled) to stay exact under int16 pair saturation."""


def needs_split(w_codes: torch.Tensor, act_bits: int) -> bool:
    """Whether u8 activations of ``act_bits`` bits times these codes can saturate a pair sum (see module doc)."""
    umax = 2**act_bits - 1
    wmax = int(w_codes.abs().max()) if w_codes.numel() else 0
    return umax * 2 * wmax > INT16_MAX


def prepack_weight(w_codes: torch.Tensor, w_scale: torch.Tensor, act_bits: int) -> OnednnWeight:
    """int8 codes (N, K) and per-channel scales (N,) or (N, 1) -> an :class:`OnednnWeight` for ``act_bits``-bit
    activations. Splits the weight when one pass could saturate (module doc)."""
    if not onednn_available():
        raise RuntimeError("this torch build has no torch.ops.onednn.qlinear_pointwise (oneDNN): use the group "
                           "kernels (tca_lightning.kernels.grouped.int8_group_gemm) instead")
    if w_codes.dtype != torch.int8 or w_codes.dim() != 2 or w_codes.device.type != "cpu":
        raise ValueError(f"weight codes must be a 2-D int8 CPU tensor (N, K), got {w_codes.dtype} of shape "
                         f"{tuple(w_codes.shape)} on {w_codes.device}")
    n, k = w_codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight codes must be non-empty, got shape {(n, k)}")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"activation bits must be 2..8 for u8 codes, got {act_bits}")
    scale = w_scale.detach().float().reshape(-1)
    if scale.numel() != n:
        raise ValueError(f"weight scale must have one value per output channel, shape ({n},) or ({n}, 1), got "
                         f"{tuple(w_scale.shape)}: group-quantized weights go through kernels.grouped")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight scales must be finite")
    wmax = int(w_codes.abs().max())
    if (2**act_bits - 1) * wmax * k > INT32_MAX:
        raise ValueError(f"K = {k} is too long for an exact int32 sum of {act_bits}-bit x |w| <= {wmax} products")
    split = needs_split(w_codes, act_bits)
    w = w_codes.contiguous()
    if split:
        lo = torch.div(w, 2, rounding_mode="floor").to(torch.int8)  # [-64, 63]
        w = torch.cat([lo, (w.to(torch.int16) - lo).to(torch.int8)], dim=1)  # hi in [-64, 64]
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    sums = w_codes.to(torch.int32).sum(1).float() * scale
    return OnednnWeight(packed, scale.contiguous(), sums, k, n, act_bits, split)


def quantize_act_u8(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(M, K) float -> (u8 codes u = q' + 2^(bits-1), FP32 scale (M, 1), shifted zero point z' (M, 1) or None).

    q' and z' are :func:`tca_lightning.kernels.reference.quantize_act_codes`' (one group of K: per token).
    """
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"activations must be a 2-D float tensor (tokens, in_features), got {x.dtype} of shape "
                         f"{tuple(x.shape)}: flatten leading dims first")
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be 2..8 for u8 codes, got {bits}")
    codes, scale, zero = quantize_act_codes(x, bits, symmetric, x.shape[1])
    u = codes.view(torch.uint8).add_(2 ** (bits - 1))  # mod 256: q' + 2^(bits-1) in [0, 2^bits)
    return u, scale, zero


def int_gemm_onednn(u: torch.Tensor, zero_point: int, weight: OnednnWeight) -> torch.Tensor:
    """FP32 (M, N) = ws[n] * sum_k (u[m, k] - zero_point) w[n, k], the sum exact in int32."""
    if u.dtype != torch.uint8 or u.dim() != 2 or u.device.type != "cpu":
        raise ValueError(f"activation codes must be a 2-D uint8 CPU tensor (M, K), got {u.dtype} of shape "
                         f"{tuple(u.shape)} on {u.device}")
    if u.shape[1] != weight.in_features:
        raise ValueError(f"activation codes have K = {u.shape[1]}, the weight {weight.in_features}")
    if not 0 <= zero_point <= 255:
        raise ValueError(f"the u8 zero point must be in [0, 255], got {zero_point}")
    if u.shape[0] == 0:
        return torch.zeros(0, weight.out_features)
    if int(u.max()) > 2**weight.act_bits - 1:
        raise ValueError(f"activation codes exceed {weight.act_bits} bits, the width the weight was prepacked for "
                         f"(its split decision depends on it): prepack_weight(..., act_bits=...)")
    a = torch.cat([u, u], dim=1) if weight.split else u.contiguous()
    zeros = torch.zeros(weight.out_features, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, zero_point, weight.packed, weight.scale, zeros, None,
                                              1.0, 0, torch.float32, "none", [], "")


def onednn_linear(x: torch.Tensor, weight: OnednnWeight, act_symmetric: bool, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = x W^T + b, x (M, K) float quantized per token to ``weight.act_bits`` bits, integer GEMM, FP32 epilogue."""
    bits = weight.act_bits
    u, scale, zero = quantize_act_u8(x, bits, act_symmetric)
    y = int_gemm_onednn(u, 2 ** (bits - 1), weight)
    if zero is not None:
        y.addr_(zero.reshape(-1), weight.code_sums, alpha=-1)  # - z'[m] ws[n] S[n]
    y.mul_(scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)

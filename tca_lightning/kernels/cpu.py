"""The W4A4 group GEMM on CPU with integer arithmetic (no dequantize-to-float), two arrangements.

- ``"int16_bmm"``: unpack both operands to int16, one batched matmul over the K/G groups,
  (K/G, M, G) @ (K/G, G, N) -> int16 (K/G, M, N). Exact because |P| <= 64 G <= 32704 for G <= 510
  (every partial sum of a group's products is bounded the same way, so nothing ever overflows).
- ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32) once per group. On CPU (torch 2.13) it takes
  any shape: M = 1, odd K and N were checked exact, so nothing is padded. (CUDA's ``_int_mm`` wants
  M > 16 and K, N multiples of 8; this module only runs on CPU tensors.)

``"auto"`` picks ``int_mm`` where oneDNN has AMX tiles (the Xeon DESIGN.md measured: INT8 ~9x FP32)
or G > 510, ``int16_bmm`` elsewhere. Measured on one thread of a loaded 2-core AMD EPYC (AVX2, no
VNNI/AMX), torch 2.13, M = 256, K = N = 1152, G = 64, best of 10: FP32 F.linear 8-11 ms, BF16
66 ms; ``w4a4_linear`` with int16_bmm ~27 ms end to end (activation quantize+pack ~1.5 ms, unpack +
int16 bmm ~18 ms, FP32 epilogue ~7 ms); with int_mm 320-440 ms (its int8 GEMMs alone ~295 ms: no
fast int8 kernel on this CPU, a single full-K ``_int_mm`` takes 235 ms). An int32 bmm took 41 ms,
int64 890 ms; an FP32 bmm of the codes (exact too, but float units) 10.5 ms.

The FP32 epilogue is :func:`tca_lightning.kernels.reference.scale_and_sum`, the reference's own,
so the CPU output equals the reference's bit for bit.
"""

from __future__ import annotations

import torch

from tca_lightning.kernels.reference import check_operands, scale_and_sum
from tca_lightning.quant.packing import unpack_int4

ARRANGEMENTS = ("auto", "int16_bmm", "int_mm")
INT16_MAX_GROUP = 510  # 64 * G must stay <= 32767; G is even


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def resolve_arrangement(arrangement: str, group_size: int) -> str:
    """``auto`` -> the arrangement to run; validate explicit choices."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
    if arrangement == "int16_bmm" and group_size > INT16_MAX_GROUP:
        raise ValueError(f"int16_bmm is exact only for group_size <= {INT16_MAX_GROUP}, got {group_size}: "
                         f"use arrangement='int_mm'")
    if arrangement != "auto":
        return arrangement
    return "int_mm" if _has_amx() or group_size > INT16_MAX_GROUP else "int16_bmm"


def group_partials_cpu(a_packed: torch.Tensor, w_packed: torch.Tensor, group_size: int,
                       arrangement: str = "auto") -> torch.Tensor:
    """Exact per-group integer dots (K/G, M, N): int16 for ``int16_bmm``, int32 for ``int_mm``."""
    if a_packed.device.type != "cpu" or w_packed.device.type != "cpu":
        raise ValueError("group_partials_cpu runs on CPU tensors; CUDA tensors go to the Triton kernel "
                         "(tca_lightning.kernels.w4a4_linear dispatches)")
    arrangement = resolve_arrangement(arrangement, group_size)
    m, n = a_packed.shape[0], w_packed.shape[0]
    a = unpack_int4(a_packed, group_size)
    w = unpack_int4(w_packed, group_size)
    groups = a.shape[1] // group_size
    if arrangement == "int16_bmm":
        # A as a strided (groups, M, G) view; W made contiguous as (groups, G, N), which bmm wants.
        a16 = a.to(torch.int16).reshape(m, groups, group_size).transpose(0, 1)
        w16 = w.to(torch.int16).reshape(n, groups, group_size).permute(1, 2, 0).contiguous()
        return torch.bmm(a16, w16)
    out = torch.empty(groups, m, n, dtype=torch.int32)
    for g in range(groups):
        cols = slice(g * group_size, (g + 1) * group_size)
        out[g] = torch._int_mm(a[:, cols].contiguous(), w[:, cols].t())
    return out


def w4a4_gemm_cpu(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                  group_size: int, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  arrangement: str = "auto") -> torch.Tensor:
    """Same contract as :func:`tca_lightning.kernels.reference.w4a4_gemm_reference`, integer dots on CPU."""
    check_operands(a_packed, a_scale, w_packed, w_scale, group_size, bias)
    partials = group_partials_cpu(a_packed, w_packed, group_size, arrangement)
    return scale_and_sum(partials, a_scale, w_scale, bias, out_dtype)

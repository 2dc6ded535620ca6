"""Uniform integer quantization as pure functions on tensors (the one place for each formula).

Conventions, after torchao's ``choose_qparams_affine`` / ``quantize_affine``:
- symmetric: q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1), s = absmax / (2^(b-1) - 1);
- asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1), s = (max - min) / (2^b - 1), z = round(-min / s);
- granularity reduces over: the whole tensor, each output channel (rows of a weight), each token
  (rows of an activation), or each group of ``group_size`` consecutive input channels (last dim);
- ``fake_quant`` rounds with a straight-through estimator (Bengio et al. 2013) so calibration can
  backpropagate through it; gradients reach ``x`` (identity inside the clip range) and, for
  learnable clipping, the clip ratio through the scale (OmniQuant's LWC, Shao et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "token", "group")
SCALE_DTYPES = ("float32", "float16")
FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized."""

    bits: int = 8
    """Integer bit width, 2..8 (16 or more means: leave in floating point)."""
    symmetric: bool = True
    """Symmetric (zero point 0) or asymmetric (min/max with a zero point)."""
    granularity: str = "channel"
    """``tensor``, ``channel`` (rows of a weight), ``token`` (rows of an activation) or ``group``."""
    group_size: int = 64
    """Consecutive input channels sharing a scale when granularity is ``group``."""
    clip_ratio: float = 1.0
    """Scale the range by this factor (< 1 clips outliers)."""
    scale_dtype: str = "float32"
    """``float16``: round scales to FP16 values, as a packed checkpoint stores them, so the fake-quant model
    computes what the deployed one does (computation stays FP32)."""

    def __post_init__(self):
        if not (2 <= self.bits <= 8 or self.bits >= 16):
            raise ValueError(f"bits must be in 2..8 (or >= 16 for no quantization), got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def to_groups(x: torch.Tensor, group_size: int, name: str = "tensor") -> torch.Tensor:
    """(..., K) -> (..., K // G, G); K must be a multiple of G."""
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k} of {name}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def _reduce_view(x: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
    """View of ``x`` whose last dim is what one scale covers."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity in ("channel", "token"):
        return x.reshape(-1, x.shape[-1])
    return to_groups(x, spec.group_size, name)


def choose_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None,
                   name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, shaped to broadcast against the grouped view of ``x`` (keepdim on the last dim).

    ``clip_ratio`` (a tensor for learnable clipping) overrides ``spec.clip_ratio``.
    """
    ratio = spec.clip_ratio if clip_ratio is None else clip_ratio
    v = _reduce_view(x, spec, name)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    eps = torch.finfo(torch.float32).tiny
    if not torch.is_grad_enabled():  # sampling: one pass for both extremes
        vmin, vmax = torch.aminmax(v, dim=-1, keepdim=True)
        absmax = torch.maximum(-vmin, vmax)
    elif spec.symmetric:  # training: abs and amax, differentiable as before
        absmax = v.abs().amax(-1, keepdim=True)
    else:
        vmin, vmax = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    if spec.symmetric:
        scale = round_scale((absmax * ratio / qmax).clamp_min(eps), spec.scale_dtype)
        zero = torch.zeros_like(scale)
    else:
        vmax = vmax.clamp_min(0) * ratio
        vmin = vmin.clamp_max(0) * ratio
        scale = round_scale(((vmax - vmin) / (qmax - qmin)).clamp_min(eps), spec.scale_dtype)
        zero = torch.round(-vmin / scale).detach()
    return scale, zero


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Scales as stored: FP16 values (floored at FP16's smallest subnormal so none rounds to 0, capped at
    its max) for ``float16``; unchanged for ``float32``. The cast passes gradients (learnable clipping)."""
    if scale_dtype == "float32":
        return scale
    return scale.clamp(FP16_MIN_SUBNORMAL, FP16_MAX).to(torch.float16).to(scale.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Integer codes (as float, in the grouped view's shape) of ``x``."""
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    v = _reduce_view(x, spec, name)
    return torch.clamp(torch.round(v / scale) + zero, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`quantize` back to ``shape``."""
    return ((q - zero) * scale).reshape(shape)


def fake_quant(x: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None,
               name: str = "tensor") -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding (dynamic: scales from ``x`` itself)."""
    if not spec.enabled:
        return x
    scale, zero = choose_qparams(x, spec, clip_ratio, name)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    v = _reduce_view(x, spec, name)
    if torch.is_grad_enabled():
        q = torch.clamp(round_ste(v / scale) + zero, qmin, qmax)
        return ((q - zero) * scale).reshape(x.shape).to(x.dtype)
    # sampling: the same arithmetic in place (no STE, no temporaries; sampling is bound by these passes)
    q = (v / scale).round_()
    if not spec.symmetric:
        q.add_(zero)
    q.clamp_(qmin, qmax)
    if not spec.symmetric:
        q.sub_(zero)
    return q.mul_(scale).reshape(x.shape).to(x.dtype)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with a fixed (calibrated) symmetric per-tensor or per-channel scale."""
    if not spec.enabled:
        return x
    qmin, qmax = qrange(spec.bits, True)
    return (torch.clamp(round_ste(x / scale), qmin, qmax) * scale).to(x.dtype)


def search_clip_ratio(x: torch.Tensor, spec: QuantSpec, grid: tuple[float, ...] = tuple(1 - 0.05 * i for i in range(10)),
                      name: str = "tensor") -> float:
    """The clip ratio on ``grid`` with the least quantization MSE (a grid search, as in AWQ/OmniQuant init)."""
    errors = [(fake_quant(x, spec, r, name) - x).pow(2).mean().item() for r in grid]
    return float(grid[min(range(len(grid)), key=errors.__getitem__)])


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (x - x_hat).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(x.pow(2).mean() / noise))

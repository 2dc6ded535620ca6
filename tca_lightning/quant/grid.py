"""Recover integer codes and per-group scales from a weight that already lies on a symmetric grid.

A finalized QuantLinear keeps its quantized weight dequantized (``codes * scale`` in FP32): that is
what the fake-quant forward multiplies with. Packing it for the integer kernels needs the codes and
scales back. Round-to-nearest puts each group's absmax on code +-qmax, so ``scale = absmax / qmax``
would do; GPTQ's error feedback and clipping (LWC, ``clip_ratio``) do not: a group's largest code
can be -2^(b-1) (the grid is asymmetric by one) or below qmax. So each group tries
``scale = absmax / c`` for c = qmax, 2^(b-1), qmax - 1, ..., 1 and keeps the first c for which every
value divides into an integer code in range (within ``tol`` code units: the dequantized FP32 values
carry a few ulps of rounding, a weight off the grid has fractional codes). Any c that passes
reproduces the group exactly (up to those ulps), so the first one is as good as the original.
"""

from __future__ import annotations

import torch

from tca_lightning.quant.quantizers import qrange, to_groups


def grid_codes(weight: torch.Tensor, bits: int, group_size: int, tol: float = 1e-3,
               name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) on-grid weight -> (int8 codes (N, K), FP32 scales (N, K / group_size)).

    ``codes * scales`` (broadcast per group) equals ``weight`` up to FP32 rounding (a few ulps).
    Raises a ValueError naming the groups that are on no symmetric ``bits``-bit grid.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name}: integer codes need 2..8 bits, got {bits}")
    qmin, qmax = qrange(bits, True)
    v = to_groups(weight.detach().float(), group_size, name)  # (N, K/G, G)
    absmax = v.abs().amax(-1, keepdim=True)
    found = absmax == 0  # an all-zero group: any scale, codes 0
    scale = torch.ones_like(absmax)
    for c in (qmax, -qmin, *range(qmax - 1, 0, -1)):
        s = absmax / c
        r = v / s.clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(r)
        ok = ((r - q).abs() <= tol) & (q >= qmin) & (q <= qmax)
        ok = ok.all(-1, keepdim=True) & ~found
        scale = torch.where(ok, s, scale)
        found |= ok
        if bool(found.all()):
            break
    if not bool(found.all()):
        bad = (~found).squeeze(-1).nonzero()[:3].tolist()
        raise ValueError(f"{name}: {int((~found).sum())} weight groups (e.g. (row, group) {bad}) are not on a "
                         f"symmetric {bits}-bit grid of group size {group_size}: pack a finalized (frozen) "
                         f"QuantLinear whose quantized_weight() comes from its own weight_spec")
    codes = torch.clamp(torch.round(v / scale), qmin, qmax)
    return codes.to(torch.int8).reshape(weight.shape), scale.squeeze(-1)

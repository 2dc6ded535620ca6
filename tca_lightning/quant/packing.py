"""Two signed 4-bit codes per byte, in the "split-half" layout the W4A4 kernels read.

Layout (fixed: the kernels in ``tca_lightning.kernels`` and the quantized checkpoints depend on it).
The last dim K is cut into groups of G consecutive input channels (the quantization groups). Within a
group, byte j (0 <= j < G/2) holds element j in its low nibble and element j + G/2 in its high
nibble, each as 4-bit two's complement (codes -8..7)::

    group codes  c0 c1 ... c(G/2-1) | c(G/2) ... c(G-1)
    byte j       low nibble = c(j),   high nibble = c(j + G/2)

So a (..., K) code tensor packs to (..., K/2) uint8, group g occupying bytes [g*G/2, (g+1)*G/2).

Why split-half and not adjacent pairs (byte j = c(2j), c(2j+1), as gpt-fast and most INT4 formats):
a kernel loads a group's (rows, G/2) bytes and gets two *contiguous* int8 halves with two shifts, the
low nibbles being channels [0, G/2) and the high ones [G/2, G). The group's dot product is the sum of
the two halves' dot products, so it never interleaves (shuffles) nibbles back into channel order.
Activations and weights use the same layout, so they agree on which channel is in which half.
"""

from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7


def check_group_size(k: int, group_size: int, what: str = "last dim") -> None:
    """Raise a ValueError unless ``group_size`` is a positive even divisor of ``k``."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number (two codes per byte, split in halves), "
                         f"got {group_size}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {what} ({k}): pad the input channels to a "
                         f"multiple of {group_size} or pick a group size that divides {k}")


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack integer codes in [-8, 7], shape (..., K), into uint8 (..., K // 2) in the split-half layout."""
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 expects integer codes, got dtype {q.dtype}: round and cast first, "
                         f"e.g. quantize(...).to(torch.int8)")
    if q.dim() == 0:
        raise ValueError("pack_int4 expects a tensor of shape (..., K), got a scalar")
    k = q.shape[-1]
    check_group_size(k, group_size, "last dim K")
    if q.numel():
        lo, hi = int(q.min()), int(q.max())
        if lo < INT4_MIN or hi > INT4_MAX:
            raise ValueError(f"int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], got values in [{lo}, {hi}]: "
                             f"clamp them (a 4-bit symmetric quantizer's grid) before packing")
    g = q.to(torch.int16).reshape(*q.shape[:-1], k // group_size, group_size)
    half = group_size // 2
    packed = (g[..., :half] & 0xF) | ((g[..., half:] & 0xF) << 4)
    return packed.to(torch.uint8).reshape(*q.shape[:-1], k // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int4`: uint8 (..., K // 2) -> int8 codes (..., K) in channel order."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 packed codes (from pack_int4), got dtype {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack_int4 expects a tensor of shape (..., K // 2), got a scalar")
    k = 2 * packed.shape[-1]
    check_group_size(k, group_size, "unpacked last dim K (2 x packed last dim)")
    b = packed.to(torch.int16).reshape(*packed.shape[:-1], k // group_size, group_size // 2)
    # (n ^ 8) - 8 sign-extends a 4-bit two's complement value n in [0, 15].
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    return torch.cat((lo, hi), dim=-1).to(torch.int8).reshape(*packed.shape[:-1], k)

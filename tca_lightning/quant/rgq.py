"""RGQ — Reordered Group Quantization: permute input channels by calibrated magnitude before grouping.

With one scale per group of G channels, a group's error is set by its largest member: a 20x
channel in a group of ordinary ones crushes them to a few levels. Sorting channels by magnitude
puts like with like, so every group's scale fits all its members (RPTQ's range clustering, Yuan et
al., "RPTQ: Reorder-based Post-training Quantization for LLMs", 2023; DESIGN.md explains why not
DuQuant's zigzag, which spreads outliers *across* groups on purpose). Weights get the same
permutation of their input columns, so (x P)(W P)^T = x W^T exactly; GPTQ then also visits the
columns in decreasing Hessian diagonal, its "act-order" heuristic, for free.

Measured (tests/test_rgq.py, and the tiny models): with *dynamic* per-token group scales the gain
depends on what the channels look like. Channels of stable magnitude (offsets, adaLN shifts) lose
~35% of their A4 error; zero-mean Gaussian channels of spread-out variance gain nothing, because a
group of 16 large channels has a larger per-token max than a group holding one of them. On
tiny-dit W4A4, reordering alone moved PSNR vs FP by -0.1..+0.3 dB, but together with GPTQ it gave
+1.5 dB over SmoothQuant+GPTQ: the ordering is what GPTQ's error feedback profits from. After ARC's
learned rotation (benchmarks/results/rgq_table.md, tiny-dit W4A4, 100 samples) the rotation has already
evened the channels: reordering changes nothing at G=16 (+0.02 dB) or G=32 (-0.10 dB), but at G=64,
where only fc2 (256 wide) still has several groups, it gives +0.95 dB; on tiny-pixart it moved PSNR by
-0.56, +0.33 and -0.18 dB at G=16/32/64. So after ARC it is no consistent gain at these widths; it can
pay where groups are coarse against the layer width, as G=128 is for DiT-XL/2 (unmeasured there).

With ARC's online Kronecker rotation in front, the permutation cannot fold into it (P (A ⊗ B) is not
a Kronecker product) nor into the producer (the rotation sits between), so it is an online gather
of k indices per token; it would fold into a dense rotation, at k^2 storage.
"""

from __future__ import annotations

import torch


def magnitude_order(energy: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts channels by decreasing calibrated energy (mean square or absmax).

    Stable, so channels of equal energy keep their order and an all-equal profile gives the identity.
    """
    if energy.dim() != 1:
        raise ValueError(f"channel energy must be a vector (in_features,), got shape {tuple(energy.shape)}")
    return torch.sort(energy, descending=True, stable=True).indices


def group_spread(energy: torch.Tensor, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over groups of max/mean of the channels' magnitude (sqrt energy): 1 is a perfectly even group.

    How much a grouping wastes of each group's range; RGQ exists to bring it down.
    """
    if energy.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide {energy.numel()} channels")
    magnitude = energy.clamp_min(0).sqrt()
    if perm is not None:
        magnitude = magnitude[perm]
    groups = magnitude.view(-1, group_size)
    return (groups.amax(1) / groups.mean(1).clamp_min(1e-12)).mean()

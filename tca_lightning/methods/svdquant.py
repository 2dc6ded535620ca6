"""SVDQuant: smoothing, then a full-precision low-rank branch that absorbs the weight outliers.

Li, Lin, Zhang, Cai, Xie, Meng, Zhu, Han et al., "SVDQuant: Absorbing Outliers by Low-Rank
Components for 4-Bit Diffusion Models", ICLR 2025.

1. Smoothing (SmoothQuant's rule, Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha),
   with max|X_j| over all calibration timesteps, one s per shared input (q/k/v together) so it
   folds like SmoothQuant's. This moves the activation outliers into the weight.
2. Low rank: the smoothed weight W_s = fold_input_transform(W, s, ...) = U S V^T (out, in) keeps
   its top r singular components L = U_r S_r V_r^T in floating point; the quantized weight
   carries only the residual W_s - L, which has a smaller range. QuantLinear computes
   y = Q(x') Q(W_s - (a b)^T)^T + b + (x' a) b, so a b = L^T = V_r S_r U_r^T: we take
   a = V_r sqrt(S_r) (in, r) and b = sqrt(S_r) U_r^T (r, out), the balanced split (both factors
   have the same scale, friendly to a 16-bit branch). In full precision the layer is unchanged.

Rank: the paper uses r = 32 for 3072-wide FLUX and 1152-wide PixArt-Sigma. With
``rank_scale_to_width`` (default) the rank keeps the same fraction of DiT-XL/2's width 1152:
r = max(1, round(rank * min(in, out) / 1152)), i.e. 32 for DiT-XL/2 and PixArt-alpha and 2 for
the 64-wide tiny models, so the FP branch costs them the same share of FLOPs. Otherwise r = rank.
r never exceeds min(in, out).

Layers whose weights stay in floating point get no low-rank branch (it would change nothing);
layers whose activations stay in floating point get no smoothing (as in ``SmoothQuant``).
"""

from __future__ import annotations

import torch

from tca_lightning.methods.base import QuantMethod, QuantRecipe, per_timestep_absmax
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.transforms import fold_input_transform, smoothquant_scales

REFERENCE_WIDTH = 1152  # DiT-XL/2 and PixArt-alpha hidden size


def lowrank_rank(rank: int, in_features: int, out_features: int, scale_to_width: bool = True,
                 reference_width: int = REFERENCE_WIDTH) -> int:
    """The low-rank branch's rank for a layer (see the module docstring)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    width = min(in_features, out_features)
    r = max(1, round(rank * width / reference_width)) if scale_to_width else rank
    return min(r, width)


def svd_lowrank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), a: (in, r), b: (r, out), with (a b)^T the best rank-r approximation of ``weight`` (out, in).

    SVD in float64; returned in the weight's dtype.
    """
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = vh[:rank].t() * root  # V_r sqrt(S_r)
    b = root[:, None] * u[:, :rank].t()  # sqrt(S_r) U_r^T
    return a.to(weight.dtype), b.to(weight.dtype)


def apply_svdquant(q: QuantLinear, rank: int, smooth: torch.Tensor | None = None) -> None:
    """Set ``smooth`` (if given), then the rank-``rank`` branch from the layer's transformed weight."""
    if smooth is not None:
        q.set_transform(smooth=smooth)
    w_s = fold_input_transform(q.weight.detach(), q.smooth, q.input_rotation, q.perm)
    q.set_lowrank(*svd_lowrank(w_s, rank))


class SVDQuant(QuantMethod):
    """SmoothQuant-style smoothing plus a low-rank FP branch on every quantized weight."""

    name = "svdquant"
    needs_stats = ("absmax",)

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), alpha: float = 0.5, rank: int = 32,
                 rank_scale_to_width: bool = True):
        """
        Args:
            recipe: bits, granularities and per-role overrides.
            alpha: smoothing migration strength (as SmoothQuant's).
            rank: rank of the FP low-rank branch (32 in the paper).
            rank_scale_to_width: scale ``rank`` by min(in, out) / 1152 (DiT-XL/2's width); see module docstring.
        """
        super().__init__(recipe)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.alpha, self.rank, self.rank_scale_to_width = alpha, rank, rank_scale_to_width

    def layer_rank(self, q: QuantLinear) -> int:
        return lowrank_rank(self.rank, q.in_features, q.out_features, self.rank_scale_to_width)

    def calibrate(self, adapter, qlinears, stats):
        for group in adapter.shared_input_groups(list(qlinears)):
            smooth = None
            if all(qlinears[n].act_spec.enabled for n in group):
                device = qlinears[group[0]].weight.device
                weight = torch.cat([qlinears[n].weight for n in group])
                act = per_timestep_absmax(stats, group[0], weight.shape[1]).amax(0)
                smooth = smoothquant_scales(act.to(device), weight, self.alpha)
            for n in group:
                q = qlinears[n]
                if q.weight_spec.enabled:
                    apply_svdquant(q, self.layer_rank(q), smooth)
                elif smooth is not None:
                    q.set_transform(smooth=smooth)

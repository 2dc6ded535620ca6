"""Learnable input transforms for ARC: T = diag(1/s) (R_a ⊗ R_b), s > 0, R_a and R_b orthogonal.

Orthogonality comes from torch's parametrization (``nn.utils.parametrizations.orthogonal`` with
the Cayley map, as FlatQuant does), never from re-orthogonalizing by hand after a step; the
Kronecker split costs d (d_a + d_b) per token online instead of d^2 (FlatQuant, Sun et al. 2024).
Scales are log-parametrized so they stay positive. With ``use_trivialization`` the optimizer
moves an unconstrained base and the rotation stays exactly orthogonal at every step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from tca_lightning.quant.transforms import apply_kron, kron_factors, random_hadamard, rotation_matrix


class _Matrix(nn.Module):
    """A bare (n, n) parameter to parametrize (not an nn.Linear: model adapters list every nn.Linear)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, n))


def _orthogonal_matrix(n: int, init: torch.Tensor) -> nn.Module:
    layer = _Matrix(n)
    orthogonal(layer, "weight", orthogonal_map="cayley")
    with torch.no_grad():
        layer.weight = init  # the parametrization's right_inverse: starts exactly at ``init``
    return layer


class KronTransform(nn.Module):
    """x -> (x / s) (R_a ⊗ R_b); ``rotate=False`` or ``scale=False`` drop either part (ablations)."""

    def __init__(self, dim: int, *, rotate: bool = True, scale: bool = True, init_scale: torch.Tensor | None = None,
                 init: str = "hadamard", seed: int = 0, learnable_rotation: bool = True):
        super().__init__()
        self.dim = dim
        self.da, self.db = kron_factors(dim)
        if init not in ("hadamard", "identity"):
            raise ValueError(f"rotation init must be 'hadamard' or 'identity', got {init!r}")
        self.rotate, self.learnable_rotation = rotate, learnable_rotation
        if rotate:
            make = (lambda n, s: random_hadamard(n, s)) if init == "hadamard" else (lambda n, s: torch.eye(n))
            ra, rb = make(self.da, seed), make(self.db, seed + 1)
            if learnable_rotation:
                self.left, self.right = _orthogonal_matrix(self.da, ra), _orthogonal_matrix(self.db, rb)
            else:
                self.register_buffer("fixed_left", ra)
                self.register_buffer("fixed_right", rb)
        self.log_scale = None
        if scale:
            s = torch.ones(dim) if init_scale is None else init_scale.detach().float().clamp_min(1e-6)
            if s.shape != (dim,):
                raise ValueError(f"init_scale must have shape ({dim},), got {tuple(s.shape)}")
            self.log_scale = nn.Parameter(s.log())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.rotate:
            return None
        if self.learnable_rotation:
            return self.left.weight, self.right.weight
        return self.fixed_left, self.fixed_right

    def scale(self) -> torch.Tensor | None:
        return None if self.log_scale is None else self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        if s is not None:
            x = x / s.to(x.dtype)
        f = self.factors()
        if f is not None:
            x = apply_kron(x, f[0].to(x.dtype), f[1].to(x.dtype))
        return x

    def rotation_matrix(self) -> torch.Tensor | None:
        f = self.factors()
        return None if f is None else rotation_matrix(f)

    def fold_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' with forward(x) @ W'^T == x @ W^T: (W diag(s)) (R_a ⊗ R_b), the factors being orthogonal
        (no inverse in the training graph, unlike fold_input_transform's fixed factors)."""
        s, f = self.scale(), self.factors()
        w = weight if s is None else weight * s.to(weight.dtype)
        return w if f is None else apply_kron(w, f[0].to(w.dtype), f[1].to(w.dtype))

    def orthogonality_error(self) -> float:
        """max over factors of ||R^T R - I||_max (0 for no rotation)."""
        f = self.factors()
        if f is None:
            return 0.0
        with torch.no_grad():
            return max(float((r.t() @ r - torch.eye(len(r), dtype=r.dtype, device=r.device)).abs().max()) for r in f)

"""Equivalence transforms of a linear layer's input, and their folds, as pure functions.

For y = x W^T + b and an invertible T: y = (x T)(W T^-T)^T + b. The transforms used here:
- smoothing (SmoothQuant, Xiao et al. 2023): T = diag(1/s), so x' = x / s and W' = W diag(s);
- orthogonal rotation (QuaRot, Ashkboos et al. 2024; FlatQuant, Sun et al. 2024): T = R, R^-T = R;
- permutation (RPTQ, Yuan et al. 2023): T = P, a permutation matrix (orthogonal);
Every function here is exact in full precision; tests check each to 1e-5 relative.

A rotation is either a dense (k, k) matrix or a Kronecker pair ``(left, right)`` meaning left ⊗ right
(FlatQuant's online form, Sun et al. 2024): (a^2 + b^2) numbers to store and k (a + b) multiply-adds per
token to apply, instead of k^2 for both, which is what keeps TCA-DiT's packed checkpoints ~4x smaller
than FP16 at DiT-XL/2 width (a dense 4608 x 4608 FP32 rotation per fc2 alone is 85 MB).
"""

from __future__ import annotations

import math

import torch

from tca_lightning.quant.quantizers import FP16_MAX

Rotation = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def hadamard(n: int, *, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Hadamard matrix of order n = 2^k * m by Sylvester's recursion on a small base.

    The base for m > 1 is an orthonormal DCT-II matrix of order m (a real orthogonal matrix that,
    like a Hadamard matrix, spreads every coordinate over all outputs), so any n works; n = 2^k
    gives the classic +-1/sqrt(n) Hadamard matrix.
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    m = n >> k
    h = dct_matrix(m, dtype=torch.float64) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    for _ in range(k):
        h = torch.kron(base, h)
    return h.to(dtype)


def dct_matrix(n: int, *, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are basis vectors)."""
    i = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


def random_hadamard(n: int, seed: int = 0, *, dtype=torch.float32) -> torch.Tensor:
    """diag(random signs) @ H: QuaRot's randomized Hadamard rotation (orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard(n, dtype=torch.float64)).to(dtype)


def kron_factors(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a <= b as close as possible (FlatQuant's Kronecker split)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def apply_kron(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ (left ⊗ right) without forming the n x n matrix: cost n (a + b) per row instead of n^2."""
    a, b = left.shape[0], right.shape[0]
    shape = x.shape
    x = x.reshape(-1, a, b)
    x = torch.matmul(torch.matmul(left.t().unsqueeze(0).expand(x.shape[0], -1, -1), x), right)
    return x.reshape(shape)


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """x @ R for a dense R or R = left ⊗ right (in x's dtype)."""
    if isinstance(rotation, tuple):
        return apply_kron(x, rotation[0].to(x.dtype), rotation[1].to(x.dtype))
    return x @ rotation.to(x.dtype)


def rotation_matrix(rotation: Rotation) -> torch.Tensor:
    """The dense (k, k) matrix of either form."""
    return torch.kron(rotation[0].contiguous(), rotation[1].contiguous()) if isinstance(rotation, tuple) else rotation


def check_rotation(rotation: Rotation, k: int, name: str) -> Rotation:
    """``rotation`` if it is a (k, k) matrix or a pair of square factors whose orders multiply to k."""
    if isinstance(rotation, (tuple, list)):
        if len(rotation) != 2:
            raise ValueError(f"rotation of {name} must be a (k, k) tensor or a (left, right) Kronecker pair, "
                             f"got {len(rotation)} factors")
        left, right = rotation
        for side, f in (("left", left), ("right", right)):
            if f.dim() != 2 or f.shape[0] != f.shape[1]:
                raise ValueError(f"{side} Kronecker factor of {name}'s rotation must be square, got {tuple(f.shape)}")
        if left.shape[0] * right.shape[0] != k:
            raise ValueError(f"Kronecker factors of {name}'s rotation have orders {left.shape[0]} x {right.shape[0]} "
                             f"= {left.shape[0] * right.shape[0]}, expected in_features {k}")
        return left, right
    if tuple(rotation.shape) != (k, k):
        raise ValueError(f"rotation of {name} must have shape {(k, k)}, got {tuple(rotation.shape)}")
    return rotation


TRANSFORM_BUFFERS = ("smooth", "rotation", "rotation_left", "rotation_right", "perm")
"""How a layer stores its fixed input transform (QuantLinear, PackedLinear, packed checkpoints)."""


def rotation_buffers(rotation: Rotation | None) -> dict[str, torch.Tensor | None]:
    """The buffers that store ``rotation``: the dense one or the two Kronecker factors, the other form None."""
    if isinstance(rotation, tuple):
        return {"rotation": None, "rotation_left": rotation[0], "rotation_right": rotation[1]}
    return {"rotation": rotation, "rotation_left": None, "rotation_right": None}


def stored_rotation(layer) -> Rotation | None:
    """The rotation a layer's buffers hold (inverse of :func:`rotation_buffers`)."""
    if layer.rotation_left is not None:
        return layer.rotation_left, layer.rotation_right
    return layer.rotation


def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5,
                       eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), per input channel j."""
    w_absmax = weight.abs().amax(0).clamp_min(eps)
    s = act_absmax.clamp_min(eps).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp_min(eps)


def fold_input_transform(weight: torch.Tensor, smooth: torch.Tensor | None = None,
                         rotation: Rotation | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """W' such that transform_input(x) @ W'^T == x @ W^T (the order of :func:`transform_input`)."""
    w = weight
    if smooth is not None:
        w = w * smooth
    if isinstance(rotation, tuple):  # W (A ⊗ B)^-T = W (A^-T ⊗ B^-T): exact for factors that are not exactly
        # orthogonal (TCA-DiT stores them rounded to FP16); for orthogonal ones it is W (A ⊗ B)
        w = apply_kron(w, *(torch.linalg.inv(f.double()).t().to(w.dtype) for f in rotation))
    elif rotation is not None:  # a dense rotation is orthogonal by contract (QuaRot's Hadamard): W R
        w = rotate(w, rotation)
    if perm is not None:
        w = w[:, perm]
    return w


def fp16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to FP16 values (clamped to FP16's finite range), kept in ``t``'s dtype: transforms baked
    this way are stored in FP16 losslessly, half the bytes of FP32."""
    return t.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(t.dtype)


def narrow_if_lossless(t: torch.Tensor | None) -> torch.Tensor | None:
    """FP16 when that loses nothing (a baked transform), else ``t`` unchanged."""
    if t is None or t.dtype == torch.float16 or not t.dtype.is_floating_point:
        return t
    half = t.to(torch.float16)
    return half if torch.equal(half.to(t.dtype), t) else t


def transform_gram(gram: torch.Tensor, smooth: torch.Tensor | None = None, rotation: Rotation | None = None,
                   perm: torch.Tensor | None = None) -> torch.Tensor:
    """X'^T X' from X^T X, for x' = transform_input(x, smooth, rotation, perm) = ((x / s) R)[..., P].

    Written as a right multiplication x' = x T with T = diag(1/s) R Pi, where Pi selects columns
    (Pi[perm[j], j] = 1), so X'^T X' = T^T (X^T X) T: divide rows and columns by s, conjugate by R,
    then take rows and columns ``perm``. Computed in float64.
    """
    g = gram.double()
    if smooth is not None:
        inv = 1.0 / smooth.double()
        g = g * inv[:, None] * inv[None, :]
    if isinstance(rotation, tuple):
        g = rotate(rotate(g, rotation).t(), rotation)  # (G R)^T R = R^T G R, G being symmetric
    elif rotation is not None:
        r = rotation.double()
        g = r.t() @ g @ r
    if perm is not None:
        g = g[perm][:, perm]
    return g


def unfold_input_transform(weight_t: torch.Tensor, smooth: torch.Tensor | None = None,
                           rotation: Rotation | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``fold_input_transform``: W with fold_input_transform(W, s, R, P) == ``weight_t``.

    Computed in float64 (R by a solve, so it need not be exactly orthogonal), returned in the input dtype.
    """
    w = weight_t.double()
    if perm is not None:
        w = w[:, invert_permutation(perm)]
    if isinstance(rotation, tuple):  # the fold multiplied by (A ⊗ B)^-T: undo with A^T ⊗ B^T
        w = apply_kron(w, rotation[0].double().t(), rotation[1].double().t())
    elif rotation is not None:
        w = torch.linalg.solve(rotation.double().t(), w.t()).t()  # W R = M  <=>  R^T W^T = M^T
    if smooth is not None:
        w = w / smooth.double()
    return w.to(weight_t.dtype)


def transform_input(x: torch.Tensor, smooth: torch.Tensor | None = None, rotation: Rotation | None = None,
                    perm: torch.Tensor | None = None) -> torch.Tensor:
    """x' = ((x / s) R)[..., P]."""
    if smooth is not None:
        x = x / smooth
    if rotation is not None:
        x = rotate(x, rotation)
    if perm is not None:
        x = x[..., perm]
    return x


def fold_output_scale(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor):
    """Scale a linear's output channels: (W diag... ) rows * scale, bias * scale (for folds into a producer)."""
    return weight * scale[:, None], None if bias is None else bias * scale


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv

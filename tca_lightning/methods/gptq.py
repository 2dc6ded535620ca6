"""GPTQ: second-order weight quantization with error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (reference code: github.com/IST-DASLab/gptq).

For a linear layer with inputs X, GPTQ minimizes ||X W^T - X Q^T||^2 column by column: each
input column of W is rounded on the layer's own quantizer grid, and its rounding error is
pushed onto the not-yet-quantized columns through the inverse Hessian H^-1, H = 2 X^T X / n
(Optimal Brain Surgeon). As in the paper: dampened H (``percdamp`` x mean diagonal), dead
inputs (zero diagonal) get H_ii = 1 and a zero weight column, the upper Cholesky factor of H^-1
replaces repeated inverse updates, and updates are applied lazily in blocks of ``block_size``
columns. Optional ``act_order`` quantizes columns by decreasing H_ii.

Grid: exactly the QuantLinear's ``weight_spec`` (``quant/quantizers.py`` does the rounding).
Per-tensor/per-channel scales come from the whole weight before any update; per-group scales
are chosen when the sweep reaches the group's first column, from the weights as updated so far
(the reference's ``static_groups=False``: like the reference, columns inside the current block
are seen as of the block's start). With ``act_order`` and groups, the columns no longer arrive
group by group, so all group scales are fixed up front (the reference's ``static_groups=True``):
the groups stay the QuantLinear's contiguous input-channel groups either way.

Combinable: with an input transform already set (by ``base``, e.g. SmoothQuant or QuaRot, or
any earlier method) the layer computes Q(x') Q(W')^T with x' = x T, T = diag(1/s) R P; GPTQ
then quantizes W' (minus a low-rank branch, if any) against the Hessian of x', which is
T^T H T (:func:`transform_gram`).

How the result is stored (the QuantLinear has no slot for "an already-quantized weight"; see
the interface note in :func:`store_quantized_weight`): ``weight`` is replaced by the GPTQ
weight mapped back to the original basis, so the layer's FP weight *is* GPTQ's weight and every
fold of it is consistent; and the exact transformed GPTQ weight is installed as the layer's
frozen weight, which is what forward uses. Re-rounding the stored weight with round-to-nearest
would not reproduce GPTQ's grid in general (error feedback can leave a row's or group's largest
code below 2^(b-1) - 1, so its absmax-based scale differs), hence the frozen copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tca_lightning.methods.base import QuantMethod, QuantRecipe
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec, choose_qparams, dequantize, quantize
from tca_lightning.quant.transforms import invert_permutation, transform_gram, unfold_input_transform  # noqa: F401


# --- pure functions --------------------------------------------------------------------------------

@dataclass
class GPTQResult:
    """GPTQ's weight (dequantized, on the grid), its scales/zero points in the grouped view that
    ``quantize``/``dequantize`` use for the spec, and the OBS loss sum (w - q)^2 / (2 [H^-1]_ii^2) per row."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    loss: torch.Tensor


def hessian_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, name: str = "linear") -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), damp = ``percdamp`` x mean diag(H)."""
    h = hessian.double().clone()
    idx = torch.arange(len(h), device=h.device)
    h[idx, idx] += percdamp * torch.diag(h).mean()
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the dampened Hessian of {name} is not positive definite (percdamp {percdamp}); "
                         "raise percdamp or collect more calibration tokens") from e


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, name: str = "linear") -> GPTQResult:
    """GPTQ of ``weight`` (out, in) on the grid of ``spec`` under the input Hessian ``hessian`` (in, in).

    Follows the reference implementation (``GPTQ.fasterquant``) step by step; see the module docstring.
    """
    if not spec.enabled:
        raise ValueError(f"weight quantization of {name} is disabled (bits {spec.bits}): nothing for GPTQ to do")
    out_features, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the Hessian of {name} has shape {tuple(hessian.shape)}, expected {(cols, cols)}")
    grouped = spec.granularity == "group"
    if grouped and cols % spec.group_size:
        raise ValueError(f"group_size {spec.group_size} does not divide in_features {cols} of {name}")
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float64).clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Scales: per tensor/channel from the whole weight; per group fixed up front only with act_order.
    col_spec = spec if spec.granularity == "tensor" else replace(spec, granularity="channel")
    if grouped:
        n_groups = cols // spec.group_size
        scale = torch.empty(out_features, n_groups, 1, device=w.device)
        zero = torch.empty_like(scale)
        if act_order:
            scale, zero = choose_qparams(w, spec, name=name)
    else:
        scale, zero = choose_qparams(w, spec, name=name)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    columns = perm.tolist() if perm is not None else list(range(cols))  # original index of each column

    u = hessian_inverse_cholesky(h, percdamp, name).float()
    q_all = torch.zeros_like(w)
    loss = torch.zeros(out_features, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = columns[i1 + i]
            if grouped:
                g = j // spec.group_size
                if not act_order and j % spec.group_size == 0:
                    s, z = choose_qparams(w[:, j:j + spec.group_size], col_spec, name=name)
                    scale[:, g], zero[:, g] = s, z
                s, z = scale[:, g], zero[:, g]
            else:
                s, z = scale, zero
            col, d = w1[:, i:i + 1], u1[i, i]
            q = dequantize(quantize(col, s, z, col_spec, name), s, z, col.shape)
            q_all[:, i1 + i] = q[:, 0]
            loss += ((col - q)[:, 0] / d) ** 2 / 2
            err = (col - q) / d
            w1[:, i:] -= err @ u1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if perm is not None:
        q_all = q_all[:, invert_permutation(perm)]
    return GPTQResult(q_all, scale, zero, loss)


def store_quantized_weight(q: QuantLinear, weight_q: torch.Tensor) -> torch.Tensor:
    """Make ``weight_q`` (in the transformed basis, on the grid) the layer's quantized weight.

    ``q.weight`` becomes the matching FP weight (transformed_weight() == weight_q up to float
    rounding, in the state dict, seen by every fold), and ``weight_q`` itself becomes the frozen
    weight that forward uses, bit-exact (``QuantLinear.set_quantized_weight``, kept by ``freeze``).
    ``set_transform``/``set_lowrank`` drop the
    quantized weight (then the layer re-rounds its weight with round-to-nearest): call this again
    after them. Returns the installed tensor.
    """
    w = weight_q.detach().to(q.weight.device, q.weight.dtype)
    if q.lowrank_a is not None:
        w_full = w + (q.lowrank_a @ q.lowrank_b).t().to(w.dtype)
    else:
        w_full = w
    q.weight.data.copy_(unfold_input_transform(w_full, q.smooth, q.input_rotation, q.perm))
    q.set_quantized_weight(w)
    return w


def layer_hessian(q: QuantLinear, stats, name: str) -> torch.Tensor:
    """H' = 2 T^T (X^T X) T / tokens for the layer's transformed input, from ``LinearStats.gram``."""
    gram = getattr(stats, "gram", {}).get(name)
    if gram is None:
        raise ValueError(f"GPTQ needs the input Gram matrix of {name}, and the statistics have none: collect "
                         "them with collect_linear_stats(adapter, trajectories, gram=True)")
    tokens = stats.tokens.get(name, 0)
    if tokens <= 0:
        raise ValueError(f"the Gram matrix of {name} was summed over {tokens} tokens: run calibration first")
    if tuple(gram.shape) != (q.in_features,) * 2:
        raise ValueError(f"the Gram matrix of {name} has shape {tuple(gram.shape)}, expected "
                         f"{(q.in_features,) * 2}: statistics from a different model?")
    gram = gram.to(q.weight.device)
    return 2.0 * transform_gram(gram, q.smooth, q.input_rotation, q.perm) / tokens


# --- the method ------------------------------------------------------------------------------------

class GPTQ(QuantMethod):
    """GPTQ on every quantized weight, after an optional ``base`` method that sets input transforms."""

    name = "gptq"

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), percdamp: float = 0.01, block_size: int = 128,
                 act_order: bool = False, base: QuantMethod | None = None):
        """
        Args:
            recipe: bits, granularities and per-role overrides (also used for ``base``'s layers).
            percdamp: Hessian dampening, as a fraction of its mean diagonal (0.01 in the paper).
            block_size: columns per lazy batch update (128 in the paper; results do not depend on it).
            act_order: quantize columns by decreasing Hessian diagonal (the reference's ``--act-order``).
            base: a method calibrated first, whose transforms GPTQ keeps (SmoothQuant, QuaRot, SVDQuant);
                its own recipe is ignored: the layers are wrapped with this recipe.
        """
        super().__init__(recipe)
        if percdamp < 0:
            raise ValueError(f"percdamp must be >= 0, got {percdamp}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.percdamp, self.block_size, self.act_order, self.base = percdamp, block_size, act_order, base
        self.needs_stats = tuple(dict.fromkeys(("gram",) + (base.needs_stats if base else ())))
        self.results: dict[str, GPTQResult] = {}

    def quantize_linear(self, q: QuantLinear, hessian: torch.Tensor, name: str | None = None) -> GPTQResult | None:
        """GPTQ one layer in place (None, untouched, when its weights are not quantized)."""
        if not q.weight_spec.enabled:
            return None
        name = name or q.name
        result = gptq_quantize(q.transformed_weight().detach(), hessian, q.weight_spec, block_size=self.block_size,
                               percdamp=self.percdamp, act_order=self.act_order, name=name)
        result.weight = store_quantized_weight(q, result.weight)  # share it: no second copy of every weight
        return result

    def calibrate(self, adapter, qlinears, stats):
        if self.base is not None:
            self.base.calibrate(adapter, qlinears, stats)
        self.results = {}
        for name, q in qlinears.items():
            if q.weight_spec.enabled:
                result = self.quantize_linear(q, layer_hessian(q, stats, name), name)
                self.results[name] = result

"""PTQ4DiT (Wu et al., NeurIPS 2024, "PTQ4DiT: Post-training Quantization for Diffusion Transformers").

What the paper does, and what we implement of it:

- Channel-wise Salience Balancing (CSB). The salience of input channel j is its absolute maximum,
  s(X_j) for the activation and s(W_j) = max_i |W_ij| for the weight (column j of our (out, in)
  weight, i.e. input channel j). Extreme activation and weight channels rarely coincide, so a
  diagonal balancing matrix B with b_j = sqrt(s(X_j) / s(W_j)) moves salience between them:
  x' = x B^-1, W' = W B, after which s(X_j) / b_j = s(W_j) b_j = sqrt(s(X_j) s(W_j)) for every j.
  Here B is ``QuantLinear.smooth`` (smooth divides x and multiplies the weight's columns), so
  ``smooth = b``. *Implemented exactly.*
- Spearman's rho-guided Salience Calibration (SSC). Activation salience changes with the timestep;
  the paper aggregates it over timesteps with weights that favour timesteps where activation and
  weight salience are *less* complementary to be balanced: with rho_t the Spearman rank correlation
  (over channels) between s(X^(t)) and s(W), eta_t = exp(-rho_t) / sum_tau exp(-rho_tau), and
  s(X_j) := sum_t eta_t s(X_j^(t)). *Implemented exactly* (rank ties averaged); a temperature
  ``tau`` (eta = softmax(-rho / tau)) is exposed, ``tau = 1`` being the paper's rule.
- One B per shared input (q/k/v of an attention, k/v of a cross-attention): s(W) is taken over the
  concatenated weights of the group, as one B must serve all of them to fold into the producer.
- The paper's offline re-parameterization (B^-1 folded into the adaLN modulation / preceding
  linear) is what the export folds do later; here we only set ``smooth``. In the fake-quant
  simulation this is exactly equivalent.

Simplifications (documented deviations):
- Activation quantization is the recipe's (dynamic per token by default); the paper calibrates
  static activation ranges and runs BRECQ/AdaRound-style block reconstruction (Q-Diffusion's
  pipeline) after CSB/SSC. We do not reconstruct: this module is the CSB+SSC transform, and a
  reconstruction/GPTQ step can be stacked on top like for any other method.
- CSB is applied to every quantized linear whose input is quantized (like our SmoothQuant), not only
  the ones the paper re-parameterizes offline; the export decides which folds are exact and which
  stay online.
"""

from __future__ import annotations

import torch

from tca_lightning.methods.base import QuantMethod, QuantRecipe, per_timestep_absmax

_EPS = 1e-5


def rank_average(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along the last dim, ties given their average rank (as scipy.stats.rankdata, minus 1)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat, dtype=torch.float64)
    for i, row in enumerate(flat):
        _, inverse, counts = torch.unique(row, sorted=True, return_inverse=True, return_counts=True)
        counts = counts.to(torch.float64)
        start = torch.cumsum(counts, 0) - counts
        out[i] = (start + (counts - 1) / 2)[inverse]
    return out.reshape(x.shape)


def spearman_rho(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of ``a`` (..., C) with ``b`` (C,); 0 where a rank vector is constant."""
    ra, rb = rank_average(a), rank_average(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    num = (ra * rb).sum(-1)
    den = ra.pow(2).sum(-1).sqrt() * rb.pow(2).sum(-1).sqrt()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def ssc_weights(act_salience: torch.Tensor, weight_salience: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """SSC's timestep weights eta (T,): softmax over timesteps of -rho_t / tau, rho_t = Spearman(s(X^(t)), s(W))."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    rho = spearman_rho(act_salience, weight_salience)
    return torch.softmax(-rho / tau, dim=0)


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """s(W_j) = max_i |W_ij|: the salience of each input channel (column) of an (out, in) weight."""
    return weight.detach().float().abs().amax(0)


def csb_scales(act_salience: torch.Tensor, w_salience: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """CSB's balancing b_j = sqrt(s(X_j) / s(W_j)) (x' = x / b, W' = W diag(b))."""
    return (act_salience.clamp_min(eps) / w_salience.clamp_min(eps)).sqrt()


class PTQ4DiT(QuantMethod):
    """Channel-wise Salience Balancing with Spearman-guided Salience Calibration (see the module docstring)."""

    name = "ptq4dit"
    needs_stats = ("absmax",)

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), tau: float = 1.0):
        """
        Args:
            recipe: bits, granularities and per-role overrides.
            tau: temperature of the SSC softmax over timesteps, eta = softmax(-rho / tau); 1 is the paper's.
        """
        super().__init__(recipe)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.timestep_weights: dict[str, torch.Tensor] = {}
        """eta (T,) of each shared-input group, keyed by its first linear's name (for inspection and plots)."""

    def calibrate(self, adapter, qlinears, stats):
        self.timestep_weights = {}
        for group in adapter.shared_input_groups(list(qlinears)):
            if any(not qlinears[n].act_spec.enabled for n in group):
                continue  # nothing to balance for an FP input
            first = qlinears[group[0]]
            act = per_timestep_absmax(stats, group[0], first.in_features)
            w_sal = weight_salience(torch.cat([qlinears[n].weight for n in group])).cpu()
            eta = ssc_weights(act, w_sal, self.tau)
            act_sal = (eta[:, None] * act).sum(0)
            b = csb_scales(act_sal, w_sal).to(first.weight.device)
            self.timestep_weights[group[0]] = eta
            for n in group:
                qlinears[n].set_transform(smooth=b)

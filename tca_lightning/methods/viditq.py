"""ViDiT-Q (Zhao et al., ICLR 2025, "ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers
for Image and Video Generation").

What the paper does, and what we implement of it:

- Static-dynamic channel balancing. DiT activations carry a *time-invariant* channel imbalance (the
  same channels are large at every timestep) plus a *time-varying* remainder (which channels stand
  out, and by how much, changes with t). ViDiT-Q removes the first with a static SmoothQuant-style
  per-channel scaling, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), and evens out the second with an
  online Hadamard rotation, which spreads whatever imbalance a timestep still has over all channels.
  We set both on the QuantLinear: ``smooth = s`` and ``rotation = R`` (a randomized Hadamard, as in
  QuaRot), so x' = (x / s) R and W' = (W diag(s)) R, exact in full precision.
  The static statistic max|X_j| is taken over all calibration timesteps (``act_stat="max"``), or as
  the mean over timesteps of the per-timestep absmax (``act_stat="mean"``, close to the official
  code's momentum-averaged activation maximum).
- Dynamic activation quantization: per token, scales computed online (the recipe's default
  ``act_granularity="token"``); the paper's "fine-grained dynamic" quantization.
- One s and one R per shared input (q/k/v together, cross-attention k/v together), so the scaling
  can fold into the producer (adaLN modulation) exactly; R stays online where the modulation is
  per-timestep.

Not implemented (simplifications): the paper's metric-decoupled mixed precision (per-layer bit
widths chosen by sensitivity to different quality metrics) and its timestep-wise quantization
parameters; weights use the recipe's quantizer (per output channel by default).
"""

from __future__ import annotations

import torch

from tca_lightning.methods.base import QuantMethod, QuantRecipe
from tca_lightning.methods.base import per_timestep_absmax
from tca_lightning.quant.transforms import random_hadamard, smoothquant_scales

ACT_STATS = ("max", "mean")


class ViDiTQ(QuantMethod):
    """Static channel scaling + online Hadamard rotation, dynamic per-token activations (see the module docstring)."""

    name = "viditq"
    needs_stats = ("absmax",)

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), alpha: float = 0.5, act_stat: str = "max",
                 seed: int = 0):
        """
        Args:
            recipe: bits, granularities and per-role overrides.
            alpha: migration strength of the static scaling, in [0, 1] (SmoothQuant's alpha).
            act_stat: how the per-timestep absmax becomes one static statistic: ``max`` or ``mean`` over timesteps.
            seed: seed of the random Hadamard sign flips (one draw per shared input).
        """
        super().__init__(recipe)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if act_stat not in ACT_STATS:
            raise ValueError(f"act_stat must be one of {ACT_STATS}, got {act_stat!r}")
        self.alpha, self.act_stat, self.seed = float(alpha), act_stat, int(seed)

    def calibrate(self, adapter, qlinears, stats):
        for i, group in enumerate(adapter.shared_input_groups(list(qlinears))):
            if any(not qlinears[n].act_spec.enabled for n in group):
                continue  # nothing to balance for an FP input
            q = qlinears[group[0]]
            act = per_timestep_absmax(stats, group[0], q.in_features)
            act = act.amax(0) if self.act_stat == "max" else act.mean(0)
            weight = torch.cat([qlinears[n].weight for n in group]).float()
            s = smoothquant_scales(act.to(weight.device), weight, self.alpha)
            rotation = random_hadamard(q.in_features, seed=self.seed * 100_003 + i).to(q.weight.device)
            for n in group:
                qlinears[n].set_transform(smooth=s, rotation=rotation)

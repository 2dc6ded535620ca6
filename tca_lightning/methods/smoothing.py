"""RTN, SmoothQuant and QuaRot: the three classic ways of setting a QuantLinear.

- RTN: round-to-nearest of the recipe (``QuantMethod`` itself).
- SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into weights with
  s_j = max|X_j|^alpha / max|W_j|^(1-alpha), over all calibration timesteps; one s per shared
  input (q/k/v together), so it folds into the producer (the adaLN modulation, to_v's rows).
- QuaRot (Ashkboos et al., NeurIPS 2024): rotate every linear input by a random Hadamard
  matrix, spreading outliers over all channels; one rotation per shared input. In a DiT the
  modulation is per timestep, so R is applied online there (as QuaRot does for its online
  Hadamards); it costs nothing in the fake-quant simulation and is counted by the kernels.
"""

from __future__ import annotations

import torch

from tca_lightning.methods.base import QuantMethod, QuantRecipe, per_timestep_absmax
from tca_lightning.quant.transforms import random_hadamard, smoothquant_scales


class RTN(QuantMethod):
    """Round-to-nearest: the recipe's quantizers, no calibration."""

    name = "rtn"


class SmoothQuant(QuantMethod):
    name = "smoothquant"
    needs_stats = ("absmax",)

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), alpha: float = 0.5):
        """
        Args:
            recipe: bits, granularities and per-role overrides.
            alpha: migration strength (0.5 in the paper; larger moves more difficulty into weights).
        """
        super().__init__(recipe)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def calibrate(self, adapter, qlinears, stats):
        for group in adapter.shared_input_groups(list(qlinears)):
            if any(not qlinears[n].act_spec.enabled for n in group):
                continue  # nothing to smooth for an FP input
            q0 = qlinears[group[0]]
            act_absmax = per_timestep_absmax(stats, group[0], q0.in_features).amax(0).to(q0.weight.device)
            weight = torch.cat([qlinears[n].weight for n in group])
            s = smoothquant_scales(act_absmax, weight, self.alpha)
            for n in group:
                qlinears[n].set_transform(smooth=s)


class QuaRot(QuantMethod):
    name = "quarot"

    def __init__(self, recipe: QuantRecipe = QuantRecipe(), seed: int = 0):
        """
        Args:
            recipe: bits, granularities and per-role overrides.
            seed: seed of the random Hadamard sign flips (one draw per shared input).
        """
        super().__init__(recipe)
        self.seed = seed

    def calibrate(self, adapter, qlinears, stats):
        for i, group in enumerate(adapter.shared_input_groups(list(qlinears))):
            if any(not qlinears[n].act_spec.enabled for n in group):
                continue
            q = qlinears[group[0]]
            rotation = random_hadamard(q.in_features, seed=self.seed * 100_003 + i).to(q.weight.device)
            for n in group:
                qlinears[n].set_transform(rotation=rotation)

"""The samplers are correct, not just deterministic: with an exact denoiser they return the data."""

import pytest
import torch

from tca_lightning.models.adapters import Condition, DiffusionAdapter
from tca_lightning.models.samplers import SamplerConfig, make_scheduler, sample
from tca_lightning.models.tiny import build_tiny_dit


class OracleAdapter(DiffusionAdapter):
    """Predicts the exact noise for a one-point data set {target}; the guided branch gets it too."""

    kind = "dit"

    def __init__(self, target, alphas_cumprod, uncond_shift=0.0):
        super().__init__(build_tiny_dit(num_layers=1))
        self.target, self.ac, self.uncond_shift = target, alphas_cumprod, uncond_shift

    def null_condition(self, batch_size):
        return Condition(labels=torch.full((batch_size,), 10))

    def forward(self, x, t, cond):
        a = self.ac[int(t)]
        eps = (x - a.sqrt() * self.target) / (1 - a).sqrt()
        eps = eps + self.uncond_shift * (cond.labels == 10).float().view(-1, 1, 1, 1)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm-solver"])
def test_exact_denoiser_recovers_the_data_point(scheduler):
    torch.manual_seed(0)
    target = torch.rand(1, 1, 32, 32) * 2 - 1
    adapter = OracleAdapter(target, make_scheduler(SamplerConfig(scheduler=scheduler)).alphas_cumprod)
    config = SamplerConfig(scheduler=scheduler, num_steps=50, guidance_scale=1.0)
    x0 = sample(adapter, Condition(labels=torch.zeros(3, dtype=torch.long)), [0, 1, 2], config)
    assert (x0 - target).abs().max() < 1e-4


def test_guidance_only_moves_away_from_the_unconditional_branch():
    torch.manual_seed(0)
    target = torch.rand(1, 1, 32, 32) * 2 - 1
    ac = make_scheduler(SamplerConfig()).alphas_cumprod
    cond = Condition(labels=torch.zeros(2, dtype=torch.long))
    # The unconditional branch disagrees by a constant: with guidance the sample must change ...
    shifted = OracleAdapter(target, ac, uncond_shift=1.0)
    guided = sample(shifted, cond, [0, 1], SamplerConfig(num_steps=20, guidance_scale=3.0))
    assert (guided - target).abs().max() > 1e-2
    # ... and when both branches agree, guidance of any scale is a no-op.
    agreeing = OracleAdapter(target, ac)
    same = sample(agreeing, cond, [0, 1], SamplerConfig(num_steps=20, guidance_scale=3.0))
    assert (same - target).abs().max() < 1e-4

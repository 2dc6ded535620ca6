"""Classifier-free-guided sampling through diffusers schedulers, reproducible per sample.

The loop is DiTPipeline's (and PixArtAlphaPipeline's): the conditional and unconditional
halves share x_t, guidance applies to the epsilon channels, and the learned-sigma channels
go to schedulers that use them (DDPM ``learned_range``) and are dropped for the others.
Every sample draws its initial noise and any per-step noise from its own generator, seeded
by (seed, index), so two models — FP and quantized — see identical noise, whatever the
batch size or device count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from tca_lightning.models.adapters import Condition, DiffusionAdapter

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm-solver": DPMSolverMultistepScheduler}
# DiT-XL/2's and PixArt-alpha's training schedule (and that of the tiny models).
TRAIN_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: DiT uses DDIM/DDPM, PixArt-alpha DPM-Solver (its pipeline's default)."""

    scheduler: str = "ddim"
    """One of ``ddim``, ``ddpm``, ``dpm-solver``."""
    num_steps: int = 50
    """Number of sampler steps."""
    guidance_scale: float = 1.5
    """Classifier-free guidance scale; 1.0 disables guidance (one forward per step)."""
    seed: int = 0
    """Base seed; sample ``i`` uses generator seed ``seed * 1_000_003 + i``."""

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"sampler.scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"sampler.guidance_scale must be >= 1.0 (1.0 = no guidance), got {self.guidance_scale}")


def make_scheduler(config: SamplerConfig, scheduler_config: dict | None = None, learned_sigma: bool = True):
    """A fresh scheduler of the configured kind over the model's training schedule."""
    base = dict(TRAIN_SCHEDULE)
    for key in TRAIN_SCHEDULE:
        if scheduler_config and key in scheduler_config:
            base[key] = scheduler_config[key]
    cls = SCHEDULERS[config.scheduler]
    extra = {"variance_type": "learned_range" if learned_sigma else "fixed_small"} if config.scheduler == "ddpm" else {}
    extra.update({"clip_sample": False} if config.scheduler in ("ddim", "ddpm") else {})
    scheduler = cls(**base, **extra)
    scheduler.set_timesteps(config.num_steps)
    return scheduler


def sample_generators(seed: int, indices: torch.Tensor | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def initial_noise(adapter: DiffusionAdapter, generators: list[torch.Generator]) -> torch.Tensor:
    c, s = adapter.in_channels, adapter.config.sample_size
    return torch.stack([torch.randn(c, s, s, generator=g) for g in generators])


@torch.no_grad()
def sample(adapter: DiffusionAdapter, cond: Condition, indices: torch.Tensor | list[int], config: SamplerConfig,
           scheduler_config: dict | None = None, progress: bool = False,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Final x_0 (B, C, H, W) in model space (pixels in [-1, 1] for the tiny models, latents otherwise).

    ``on_step(step, t, x_t)`` sees every x_t before the model call (calibration trajectories).
    """
    if len(cond) != len(indices):
        raise ValueError(f"{len(cond)} conditions for {len(indices)} sample indices")
    device = next(adapter.transformer.parameters()).device
    dtype = next(adapter.transformer.parameters()).dtype
    scheduler = make_scheduler(config, scheduler_config, adapter.learned_sigma)
    generators = sample_generators(config.seed, indices)
    x = initial_noise(adapter, generators).to(device, dtype) * scheduler.init_noise_sigma
    guided = config.guidance_scale > 1.0
    cond = cond.to(device)
    model_cond = cond.cat(adapter.null_condition(len(cond)).to(device)) if guided else cond
    c = adapter.in_channels
    use_sigma = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    for step, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        if on_step is not None:
            on_step(step, t, x)
        x_in = scheduler.scale_model_input(x, t)
        out = adapter.forward(torch.cat([x_in, x_in]) if guided else x_in, t, model_cond).float()
        if guided:
            cond_out, uncond_out = out.chunk(2)
            eps = uncond_out[:, :c] + config.guidance_scale * (cond_out[:, :c] - uncond_out[:, :c])
            out = torch.cat([eps, cond_out[:, c:]], dim=1)
        model_output = out if use_sigma else out[:, :c]
        x = scheduler.step(model_output, t, x.float(), generator=generators).prev_sample.to(dtype)
    return x.float()


@torch.no_grad()
def decode(x0: torch.Tensor, vae: torch.nn.Module | None = None) -> torch.Tensor:
    """Images in [0, 1]: pixel-space models map [-1, 1] -> [0, 1]; latent models go through the VAE."""
    if vae is not None:
        x0 = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    return (x0 / 2 + 0.5).clamp(0, 1).contiguous()  # a VAE may decode to a channels-last layout

"""Post-training quantization of a loaded model with one method: calibrate, then quantize in place.

Calibration items are FP trajectories (data/calibration.py) of ``num_conditions`` conditions
drawn like the evaluation's (class i mod 10 / a caption naming it) but with their own noise
seed, so calibration never sees the evaluation's noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tca_lightning.data.calibration import LinearStats, cached_trajectories, collect_linear_stats
from tca_lightning.data.conditions import batch_condition, condition_batch
from tca_lightning.methods.base import QuantMethod
from tca_lightning.models.adapters import DiffusionAdapter
from tca_lightning.models.samplers import SamplerConfig


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration budget, shared by every method so comparisons are fair."""

    num_conditions: int = 64
    """Conditions sampled with the FP model (PTQ4DiT uses 64 for DiT-XL/2-256)."""
    num_steps: int = 25
    """Sampler steps of the calibration trajectories (PTQ4DiT: 25 timesteps of a 50-step sampler... we sample 25)."""
    seed: int = 1000
    """Noise seed of the calibration trajectories (differs from the evaluation's)."""
    batch_size: int = 64
    """Items per forward when collecting statistics."""
    cache_dir: str | None = "cache/calibration"
    """Where trajectories are cached (None: regenerate every run)."""

    def __post_init__(self):
        if self.num_conditions < 1 or self.num_steps < 1:
            raise ValueError(f"calibration needs num_conditions >= 1 and num_steps >= 1, got {self}")


def calibration_statistics(adapter: DiffusionAdapter, sampler: SamplerConfig, config: CalibrationConfig,
                           model_name: str, gram: bool = False) -> LinearStats:
    batch = condition_batch(config.num_conditions, seed=config.seed)
    device = next(adapter.transformer.parameters()).device
    traj_sampler = SamplerConfig(scheduler=sampler.scheduler, num_steps=config.num_steps,
                                 guidance_scale=sampler.guidance_scale, seed=config.seed)
    traj = cached_trajectories(adapter, batch_condition(adapter, batch, device), batch["index"], traj_sampler,
                               config.cache_dir, model_name)
    return collect_linear_stats(adapter, traj, gram=gram, batch_size=config.batch_size)


def quantize_model(adapter: DiffusionAdapter, method: QuantMethod, sampler: SamplerConfig,
                   config: CalibrationConfig, model_name: str) -> dict:
    """Calibrate ``method`` on FP trajectories and quantize ``adapter``'s transformer in place.

    Returns a record with the wall-clock calibration time (trajectories + statistics + method).
    """
    start = time.perf_counter()
    stats = None
    if method.needs_stats:
        stats = calibration_statistics(adapter, sampler, config, model_name, gram="gram" in method.needs_stats)
    qlinears = method.quantize(adapter, stats)
    return {"calib_seconds": round(time.perf_counter() - start, 2), "num_quantized_linears": len(qlinears),
            "stats": stats}

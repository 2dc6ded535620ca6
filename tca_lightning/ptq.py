"""Post-training quantization of a loaded model with one method: calibrate, then quantize in place.

Calibration items are FP trajectories (data/calibration.py) of ``num_conditions`` conditions
drawn like the evaluation's (class i mod 10 / a caption naming it) but with their own noise
seed, so calibration never sees the evaluation's noise.
"""

from __future__ import annotations

import time

from tca_lightning.data.calibration import (CalibrationConfig, LinearStats, calibration_trajectories,
                                           collect_linear_stats)
from tca_lightning.methods.base import QuantMethod
from tca_lightning.models.adapters import DiffusionAdapter
from tca_lightning.models.samplers import SamplerConfig

__all__ = ["CalibrationConfig", "calibration_statistics", "quantize_model"]


def calibration_statistics(adapter: DiffusionAdapter, sampler: SamplerConfig, config: CalibrationConfig,
                           model_name: str, gram: bool = False) -> LinearStats:
    traj = calibration_trajectories(adapter, sampler, config, model_name)
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

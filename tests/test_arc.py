"""ARC (issue 4, in progress): fits on ATG items, keeps rotations orthogonal, folds exactly."""

import dataclasses

import lightning as L
import torch

from tca_lightning.arc import ARC, ARCConfig
from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.methods.base import QuantRecipe
from tca_lightning.models.adapters import Condition
from tca_lightning.models.samplers import SamplerConfig

RECIPE = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=32)


def _fit(tmp_path, epochs=2, **arc):
    sampler = SamplerConfig(num_steps=4)
    module = ARC(model="random:tiny-dit", recipe=RECIPE, arc=ARCConfig(**arc), sampler=sampler, reference_cache=None,
                 calibration=CalibrationConfig(num_conditions=4, num_steps=4, cache_dir=str(tmp_path)))
    data = ATGDataModule(k=2, calib_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(module, data)
    return module, trainer


def test_fit_moves_the_transforms_and_keeps_rotations_orthogonal(tmp_path):
    module, trainer = _fit(tmp_path)
    assert module.transforms and all(t.orthogonality_error() <= 1e-5 for t in module.transforms.values())
    first = next(iter(module.transforms.values()))
    assert not torch.allclose(first.log_scale, torch.zeros_like(first.log_scale))
    assert {"train/recon", "train/align", "recon/block0"} <= set(trainer.callback_metrics)
    assert module._quant_record["max_orthogonality_error"] <= 1e-5


def test_calibrated_transforms_are_exact_when_quantization_is_off(tmp_path):
    module, _ = _fit(tmp_path, epochs=1)
    for q in module.qlinears.values():
        q.set_specs(dataclasses.replace(q.weight_spec, bits=16), dataclasses.replace(q.act_spec, bits=16))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(500)
    cond = Condition(labels=torch.tensor([1, 2]))
    fp = module.reference_model(x, timestep=t.expand(2), class_labels=cond.labels).sample
    out = module.adapter.forward(x, t, cond)
    assert ((out - fp).abs().max() / fp.abs().max()) <= 1e-5

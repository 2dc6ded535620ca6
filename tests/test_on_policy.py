"""On-policy calibration states (callbacks/on_policy.py, ATGDataModule.resample_with)."""

import lightning as L
import pytest
import torch

from tca_lightning.arc import ARC, ARCConfig
from tca_lightning.callbacks import OnPolicyStates
from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.methods.base import QuantRecipe
from tca_lightning.models.samplers import SamplerConfig

RECIPE = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=32)


def _module(tmp_path):
    # calibration batches of 3 over 4 conditions: re-sampling runs in two uneven chunks
    return ARC(model="random:tiny-dit", recipe=RECIPE, arc=ARCConfig(), sampler=SamplerConfig(num_steps=4),
               reference_cache=None,
               calibration=CalibrationConfig(num_conditions=4, num_steps=4, batch_size=3, cache_dir=str(tmp_path)))


def _fit(tmp_path, epochs, callbacks=(), module=None, ckpt_path=None, checkpoint_dir=None):
    module = module or _module(tmp_path)
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(checkpoint_dir, save_top_k=-1, every_n_epochs=1,
                                                       filename="{epoch}")] if checkpoint_dir else []
    dm = ATGDataModule(k=2, calib_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=bool(checkpoints),
                        default_root_dir=tmp_path, enable_progress_bar=False, log_every_n_steps=1,
                        callbacks=[*checkpoints, *callbacks], enable_model_summary=False)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, dm, trainer


def test_resampling_with_the_fp_model_reproduces_its_trajectories(tmp_path):
    module, dm, _ = _fit(tmp_path, epochs=1)
    states = dm.resample_with(module.teacher)
    assert torch.equal(states.timesteps, dm.traj.timesteps)
    torch.testing.assert_close(states.x, dm.traj.x, atol=1e-5, rtol=1e-5)  # same noise, conditions, sampler


def test_resampling_with_the_quantized_model_moves_the_states_the_items_stream(tmp_path):
    module, dm, _ = _fit(tmp_path, epochs=1)
    loader = dm.train_dataloader()
    with torch.no_grad(), torch.nn.utils.parametrize.cached():
        states = dm.resample_with(module.adapter)
    assert torch.equal(states.x[0], dm.traj.x[0])  # both start from the same noise
    assert (states.x[-1] - dm.traj.x[-1]).abs().max() > 1e-3  # and part as the quantized model errs
    g, j = 1, 2
    item = loader.dataset[g * 4 + j]  # the loader made before the re-sampling reads the new states
    assert torch.equal(item["x"], states.x[int(dm.groups.representatives[g]), j])


def test_resampling_refuses_states_of_another_budget(tmp_path):
    _, dm, _ = _fit(tmp_path, epochs=1)
    other = dm.traj.subset([0, 1])
    with pytest.raises(ValueError, match="another calibration budget"):
        dm.use_states(other)
    with pytest.raises(RuntimeError, match="setup"):
        ATGDataModule().resample_with(None)


def test_schedule_and_bad_arguments():
    once, every = OnPolicyStates(start_epoch=2), OnPolicyStates(start_epoch=1, every_n_epochs=2)
    assert [once.due(e) for e in range(5)] == [None, None, 2, 2, 2]
    assert [every.due(e) for e in range(6)] == [None, 1, 1, 3, 3, 5]
    with pytest.raises(ValueError, match="start_epoch must be >= 1"):
        OnPolicyStates(start_epoch=0)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0"):
        OnPolicyStates(every_n_epochs=-1)


def test_fit_switches_to_the_quantized_models_states(tmp_path):
    callback = OnPolicyStates(start_epoch=1, progress=False)
    _, dm, trainer = _fit(tmp_path, epochs=2, callbacks=[callback])
    assert dm.states is not dm.traj and dm.states is callback._states
    assert float(trainer.callback_metrics["on_policy/state_shift"]) > 0


def test_resume_after_the_resampling_streams_the_same_states(tmp_path):
    straight, _, _ = _fit(tmp_path / "a", epochs=3, callbacks=[OnPolicyStates(start_epoch=1, progress=False)])
    _fit(tmp_path / "b", epochs=2, callbacks=[OnPolicyStates(start_epoch=1, progress=False)],
         checkpoint_dir=tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt" / "epoch=1.ckpt"  # taken after epoch 1's re-sampling, by a model that moved on since
    callback = OnPolicyStates(start_epoch=1, progress=False)
    resumed, dm, _ = _fit(tmp_path / "b", epochs=3, callbacks=[callback], module=_module(tmp_path / "b"),
                          ckpt_path=str(ckpt))
    assert callback._sampled_at == 1 and dm.states is callback._states
    a, b = straight.transforms.state_dict(), resumed.transforms.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key

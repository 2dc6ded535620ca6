"""The ATG DataModule streams items at the representative timesteps, with group weights."""

import pytest
import torch

from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.models.samplers import SamplerConfig


@pytest.mark.parametrize("model, key", [("random:tiny-dit", "labels"), ("random:tiny-pixart", "tokens")])
@pytest.mark.parametrize("selection", ["atg", "uniform", "all"])
def test_items_are_at_the_selected_steps_with_weights(model, key, selection, tmp_path):
    dm = ATGDataModule(model=model, sampler=SamplerConfig(guidance_scale=1.0), k=3, selection=selection,
                       calibration=CalibrationConfig(num_conditions=4, num_steps=6, cache_dir=str(tmp_path)),
                       calib_batch_size=5)
    dm.prepare_data()
    dm.setup("fit")
    k = 6 if selection == "all" else dm.groups.k
    assert 1 <= k <= (6 if selection == "all" else 3)
    assert torch.isclose(dm.groups.weights.sum(), torch.tensor(1.0))
    items = [item for batch in dm.train_dataloader() for item in _unbatch(batch)]
    assert len(items) == 4 * k
    reps = set(dm.traj.timesteps[dm.groups.representatives].tolist())
    assert {int(it["timestep"]) for it in items} == reps
    assert all(key in it for it in items)
    assert len(list(tmp_path.glob("trajectories-*.pt"))) == 1  # cached by prepare_data, reused by setup


def _unbatch(batch):
    n = len(batch["x"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def test_bad_selection_is_a_clear_error():
    with pytest.raises(ValueError, match="selection must be one of"):
        ATGDataModule(selection="random")


def test_model_sampler_and_budget_default_to_the_module_being_fit(tmp_path):
    """One config states them once: the DataModule asks the LightningModule (ARC.calibration_source)."""

    class Source:
        def calibration_source(self):
            from tca_lightning.models.adapters import get_adapter
            from tca_lightning.models.loading import load_model

            loaded = load_model("random:tiny-dit")
            return ("random:tiny-dit", get_adapter(loaded.transformer), SamplerConfig(guidance_scale=1.0),
                    CalibrationConfig(num_conditions=3, num_steps=5, cache_dir=None))

    class FakeTrainer:
        lightning_module = Source()

    dm = ATGDataModule(k=2, selection="uniform")
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    assert dm.traj.x.shape[:2] == (5, 3) and dm.groups.k == 2
    assert dm.summary()["calib_items"] == 6 and dm.seconds > 0


def test_without_a_model_or_a_source_module_is_a_clear_error():
    with pytest.raises(ValueError, match="needs model="):
        ATGDataModule().setup("fit")


def test_test_stage_streams_the_evaluation_conditions_without_calibrating():
    dm = ATGDataModule(num_samples=7, batch_size=4)
    dm.setup("test")
    assert dm.groups is None
    assert [len(b["index"]) for b in dm.test_dataloader()] == [4, 3]

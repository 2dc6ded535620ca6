"""The ATG DataModule streams items at the representative timesteps, with group weights."""

import pytest
import torch

from tca_lightning.data.atg_datamodule import ATGDataModule
from tca_lightning.models.samplers import SamplerConfig


@pytest.mark.parametrize("model, key", [("random:tiny-dit", "labels"), ("random:tiny-pixart", "tokens")])
@pytest.mark.parametrize("selection", ["atg", "uniform", "all"])
def test_items_are_at_the_selected_steps_with_weights(model, key, selection, tmp_path):
    dm = ATGDataModule(model=model, sampler=SamplerConfig(num_steps=6), num_conditions=4, k=3,
                       selection=selection, batch_size=5, cache_dir=str(tmp_path))
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

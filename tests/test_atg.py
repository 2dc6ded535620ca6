"""ATG: signatures, faiss clustering into timestep groups, and the ablation selections."""

import pytest
import torch

from tca_lightning.data.atg import anomaly_signatures, group_timesteps, select_timesteps


def _profiles(t=30, c=16):
    """Three regimes of anomaly channels over the trajectory: channel 3, then 9, then 14 is the outlier."""
    absmax = torch.ones(t, c)
    absmax[:10, 3] = 50.0
    absmax[10:22, 9] = 50.0
    absmax[22:, 14] = 50.0
    return {"blk0.fc1": absmax * torch.linspace(1, 2, t)[:, None], "blk0.fc2": absmax.clone()}


def test_signatures_ignore_overall_scale_and_are_unit_norm():
    sig = anomaly_signatures(_profiles())
    assert sig.shape == (30, 32)
    assert torch.allclose(sig.norm(dim=1), torch.ones(30), atol=1e-5)
    assert torch.allclose(sig[0], sig[5], atol=1e-5)  # same profile shape, different scale
    assert not torch.allclose(sig[0], sig[15], atol=1e-2)


def test_atg_recovers_the_three_regimes():
    groups = group_timesteps(anomaly_signatures(_profiles()), k=3)
    assert groups.k == 3
    assert groups.assignment[:10].unique().numel() == 1 and groups.assignment[10:22].unique().numel() == 1
    assert groups.assignment[22:].unique().numel() == 1 and groups.assignment.unique().numel() == 3
    assert torch.allclose(groups.weights, torch.tensor([10 / 30, 12 / 30, 8 / 30]))
    assert groups.representatives.tolist() == sorted(groups.representatives.tolist())
    for rep, g in zip(groups.representatives.tolist(), range(3)):
        assert groups.assignment[rep] == g  # each representative belongs to its own group


def test_uniform_and_all_selections():
    uniform = select_timesteps("uniform", 50, 10)
    assert uniform.representatives.tolist() == torch.linspace(0, 49, 10).round().long().tolist()
    assert torch.isclose(uniform.weights.sum(), torch.tensor(1.0))
    everything = select_timesteps("all", 50, 10)
    assert everything.k == 50 and torch.equal(everything.assignment, torch.arange(50))


@pytest.mark.parametrize("mode, k, message", [("kmeans", 3, "one of"), ("atg", 3, "signatures"), ("uniform", 0, "K")])
def test_bad_selections_are_clear_errors(mode, k, message):
    with pytest.raises(ValueError, match=message):
        select_timesteps(mode, 20, k)


def test_k_larger_than_t_is_an_error():
    with pytest.raises(ValueError, match="K=40 for T=30"):
        group_timesteps(anomaly_signatures(_profiles()), k=40)


def test_atg_cluster_figure_is_written(tmp_path):
    from tca_lightning.callbacks.anomaly import atg_cluster_figure, write_figure

    sig = anomaly_signatures(_profiles())
    groups = group_timesteps(sig, k=3)
    path = write_figure(atg_cluster_figure(sig, groups.assignment, groups.representatives), tmp_path / "atg.png")
    assert path.is_file() and path.stat().st_size > 1000 and [p.name for p in tmp_path.iterdir()] == ["atg.png"]

"""RGQ: channels sorted by calibrated magnitude before group quantization; the permutation folds exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tca_lightning.callbacks.finalize import reorder_groups
from tca_lightning.data.calibration import LinearStats
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec
from tca_lightning.quant.rgq import group_spread, magnitude_order
from tca_lightning.quant.transforms import random_hadamard

G4 = QuantSpec(bits=4, granularity="group", group_size=16)


def outlier_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [3, 21, 38, 60]] *= 25.0  # one anomaly channel in each group of 16
    return x


def test_magnitude_order_is_descending_and_stable():
    energy = torch.tensor([1.0, 5.0, 1.0, 3.0])
    assert magnitude_order(energy).tolist() == [1, 3, 0, 2]
    assert torch.equal(magnitude_order(torch.ones(8)), torch.arange(8))
    with pytest.raises(ValueError, match="must be a vector"):
        magnitude_order(torch.ones(2, 2))


def test_reordering_evens_out_the_groups():
    energy = outlier_inputs().pow(2).mean(0)
    assert group_spread(energy, 16, magnitude_order(energy)) < 0.6 * group_spread(energy, 16)
    with pytest.raises(ValueError, match="does not divide"):
        group_spread(energy, 48)


def _layer(x, smooth=True, rotate=True):
    torch.manual_seed(1)
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), G4, G4, name="blk.0.fc1")
    q.set_transform(smooth=(x.abs().amax(0) ** 0.5) if smooth else None, rotation=random_hadamard(64, 3) if rotate else None)
    stats = LinearStats(torch.arange(1), gram={"blk.0.fc1": (x.t() @ x).double()}, tokens={"blk.0.fc1": len(x)})
    return q, stats


@pytest.mark.parametrize("smooth, rotate", [(False, False), (True, False), (True, True)])
def test_the_permutation_folds_exactly(smooth, rotate):
    x = outlier_inputs()
    q, stats = _layer(x, smooth, rotate)
    exact = torch.nn.functional.linear(x, q.weight, q.bias)
    perms = reorder_groups({"blk.0.fc1": q}, stats)
    assert "blk.0.fc1" in perms and q.perm is not None and not torch.equal(q.perm, torch.arange(64))
    off = QuantSpec(bits=16)
    q.set_specs(off, dataclasses.replace(off))  # the permutation stays; only the rounding goes
    assert ((q(x) - exact).abs().max() / exact.abs().max()) <= 1e-5


def systematic_inputs(n=512, d=64, seed=0):
    """Channels of stable, widely spread magnitudes (like adaLN-shifted DiT channels)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1.5, d)[torch.randperm(d, generator=g)]
    return scales * (1 + 0.3 * torch.randn(n, d, generator=g))


def test_reordering_cuts_the_a4_group_error_on_channels_of_stable_magnitude():
    x = systematic_inputs()
    q, stats = _layer(x, smooth=False, rotate=False)
    q.set_specs(weight_spec=QuantSpec(bits=16))  # the activations' share: what the grouping changes
    exact = torch.nn.functional.linear(x, q.weight, q.bias)
    err_plain = (q(x) - exact).pow(2).mean()
    reorder_groups({"blk.0.fc1": q}, stats)
    err_rgq = (q(x) - exact).pow(2).mean()
    assert err_rgq < 0.8 * err_plain, (err_rgq, err_plain)


def test_layers_without_grouped_activations_are_left_alone():
    x = outlier_inputs()
    q, stats = _layer(x)
    q.set_specs(act_spec=QuantSpec(bits=8, granularity="token"))
    assert reorder_groups({"blk.0.fc1": q}, stats) == {} and q.perm is None

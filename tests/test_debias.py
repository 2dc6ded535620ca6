"""Noise-debiased GELU (quant/debias.py) and the output-noise measurement it is calibrated with."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tca_lightning.data.calibration import collect_output_noise, generate_trajectories
from tca_lightning.methods import QuantRecipe, wrap_linears
from tca_lightning.models.adapters import Condition
from tca_lightning.models.samplers import SamplerConfig
from tca_lightning.quant.debias import (DebiasedGELU, debiased_gelu, gelu_parents, gelu_second_derivative,
                                        install_debiased_gelu, remove_debiased_gelu)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_second_derivative_matches_autograd(approximate):
    y = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(F.gelu(y, approximate=approximate).sum(), y, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), y)
    torch.testing.assert_close(gelu_second_derivative(y.detach(), approximate), d2, atol=1e-10, rtol=1e-8)


def test_second_derivative_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        gelu_second_derivative(torch.zeros(3), "sigmoid")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_debias_removes_the_mean_shift_of_noise(approximate):
    """E[GELU(y + n)] - GELU(y) is the bias quantization noise adds; the debiased GELU cuts it > 20x."""
    g = torch.Generator().manual_seed(0)
    y = torch.linspace(-3, 3, 61, dtype=torch.float64)
    sigma = 0.15
    noise = sigma * torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    noise = torch.cat([noise, -noise])  # antithetic: the odd moments cancel exactly
    var = torch.full((61,), sigma ** 2, dtype=torch.float64)
    plain = (F.gelu(y + noise, approximate=approximate).mean(0) - F.gelu(y, approximate=approximate)).abs().max()
    fixed = (debiased_gelu(y + noise, var, approximate).mean(0) - F.gelu(y, approximate=approximate)).abs().max()
    assert plain > 5e-3  # the bias is real at this noise level ...
    assert fixed < plain / 20  # ... and the second-order correction removes it


def _pixart_noise_setup(adapter):
    cond = adapter.encode_captions(["a handwritten seven"] * 3)
    traj = generate_trajectories(adapter, cond, list(range(3)), SamplerConfig(num_steps=3), progress=False)
    qlinears = wrap_linears(adapter, QuantRecipe(wbits=4, abits=4))
    return traj, qlinears


def test_output_noise_is_zero_unquantized_and_matches_a_direct_measurement(pixart_adapter):
    traj, qlinears = _pixart_noise_setup(pixart_adapter)
    name = "transformer_blocks.0.ff.net.0.proj"
    q = qlinears[name]
    seen = []

    def capture(mod, args, out):
        seen.append((out - F.linear(args[0], mod.weight, mod.bias)).reshape(-1, out.shape[-1]))
    handle = q.register_forward_hook(capture)
    noise = collect_output_noise(pixart_adapter, traj, {name: q})
    handle.remove()
    direct = torch.cat(seen).square().mean(0)
    torch.testing.assert_close(noise[name], direct, rtol=1e-4, atol=1e-10)
    assert float(noise[name].min()) > 0

    q.set_specs(weight_spec=dataclasses.replace(q.weight_spec, bits=16),
                act_spec=dataclasses.replace(q.act_spec, bits=16))
    assert float(collect_output_noise(pixart_adapter, traj, {name: q})[name].max()) < 1e-10
    with pytest.raises(ValueError, match="step_weights"):
        collect_output_noise(pixart_adapter, traj, {name: q}, step_weights=torch.ones(7))


def test_install_keeps_the_linear_name_and_remove_restores_the_output(pixart_adapter, make_inputs):
    transformer = pixart_adapter.transformer
    _, qlinears = _pixart_noise_setup(pixart_adapter)
    parents = gelu_parents(transformer, list(qlinears))
    assert parents and all(p.endswith("ff.net.0") for p in parents)
    x, t, cond = make_inputs(pixart_adapter)
    with torch.no_grad():
        before = pixart_adapter.forward(x, t, cond)
        width = {p: m.proj.out_features for p, m in parents.items()}
        install_debiased_gelu(transformer, {p: torch.zeros(w) for p, w in width.items()})
        assert all(isinstance(transformer.get_submodule(p), DebiasedGELU) for p in parents)
        assert all(transformer.get_submodule(f"{p}.proj") is qlinears[f"{p}.proj"] for p in parents)
        torch.testing.assert_close(pixart_adapter.forward(x, t, cond), before)  # zero variance: no change
        install_debiased_gelu(transformer, {p: torch.full((w,), 0.05) for p, w in width.items()})
        moved = pixart_adapter.forward(x, t, cond)
        assert (moved - before).abs().max() > 1e-4  # a variance moves the output
        state = copy.deepcopy(transformer.state_dict())
        assert all(f"{p}.noise_var" in state for p in parents)
        remove_debiased_gelu(transformer)
        torch.testing.assert_close(pixart_adapter.forward(x, t, cond), before)


def test_bad_noise_var_is_refused(pixart_adapter):
    transformer = pixart_adapter.transformer
    name = "transformer_blocks.0.ff.net.0"
    proj = transformer.get_submodule(name).proj
    with pytest.raises(ValueError, match="one variance per output channel"):
        DebiasedGELU(proj, "tanh", torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        DebiasedGELU(proj, "tanh", -torch.ones(proj.out_features))
    with pytest.raises(ValueError, match="not diffusers' GELU"):
        install_debiased_gelu(transformer, {"transformer_blocks.0.ff.net.2": torch.zeros(4)})

"""The method interface, the recipe, the calibration-data path, and RTN / SmoothQuant / QuaRot."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tca_lightning.data.calibration import Trajectories, collect_linear_stats, generate_trajectories
from tca_lightning.methods import RTN, QuantRecipe, QuaRot, SmoothQuant, wrap_linears
from tca_lightning.models.adapters import Condition, get_adapter
from tca_lightning.models.samplers import SamplerConfig
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec


def _stats(adapter, n=4, steps=3, gram=False):
    if adapter.kind == "dit":
        cond = Condition(labels=torch.arange(n) % 10)
    else:
        cond = adapter.encode_captions(["a handwritten seven"] * n)
    traj = generate_trajectories(adapter, cond, list(range(n)), SamplerConfig(num_steps=steps), progress=False)
    return traj, collect_linear_stats(adapter, traj, gram=gram, progress=False)


def _inputs(adapter, traj, step=1):
    cond = Condition(labels=traj.cond.labels) if adapter.kind == "dit" else traj.cond
    return traj.x[step], traj.timesteps[step], cond


def _disable_quant(qlinears):
    for q in qlinears.values():
        q.weight_spec = dataclasses.replace(q.weight_spec, bits=16)
        q.act_spec = dataclasses.replace(q.act_spec, bits=16)
        q.unfreeze()


def test_recipe_rejects_unknown_roles_and_keys():
    with pytest.raises(ValueError, match="unknown roles"):
        QuantRecipe(role_overrides={"attention": {"wbits": 8}})
    with pytest.raises(ValueError, match="unknown keys"):
        QuantRecipe(role_overrides={"final": {"bitz": 8}})
    with pytest.raises(ValueError, match="bits"):
        QuantRecipe(wbits=1)


def test_recipe_role_overrides_and_skip():
    recipe = QuantRecipe(wbits=4, abits=4, role_overrides={"final": {"skip": True}, "adaln": {"abits": 16}})
    assert recipe.specs("final") is None
    w, a = recipe.specs("adaln")
    assert (w.bits, a.bits) == (4, 16)
    assert recipe.specs("fc1")[0].bits == 4


def test_wrap_linears_swaps_every_role_but_skipped_ones(dit_adapter):
    recipe = QuantRecipe(role_overrides={"final": {"skip": True}})
    wrapped = wrap_linears(dit_adapter, recipe)
    refs = dit_adapter.linears()
    assert {r.name for r in refs if r.role != "final"} == set(wrapped)
    assert all(isinstance(r.module, QuantLinear) == (r.role != "final") for r in refs)
    assert all(dit_adapter.transformer.get_submodule(n) is q for n, q in wrapped.items())


def test_collect_linear_stats_matches_direct_capture(dit_adapter):
    traj, stats = _stats(dit_adapter, gram=True)
    name = "transformer_blocks.1.ff.net.2"
    module = dit_adapter.transformer.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    x, t, cond = _inputs(dit_adapter, traj, step=2)
    dit_adapter.forward(torch.cat([x, x]), t, cond.cat(dit_adapter.null_condition(len(x))))
    handle.remove()
    direct = seen[0]
    assert torch.allclose(stats.absmax[name][2], direct.abs().amax(0), rtol=1e-5)
    assert stats.absmax[name].shape == (3, module.in_features)
    assert stats.tokens[name] == 3 * direct.shape[0]
    assert torch.allclose(stats.gram[name], stats.gram[name].t())


def test_trajectories_round_trip(tmp_path, dit_adapter):
    traj, _ = _stats(dit_adapter, steps=2)
    traj.save(tmp_path / "t.pt")
    back = Trajectories.load(tmp_path / "t.pt")
    assert torch.equal(back.x, traj.x) and torch.equal(back.timesteps, traj.timesteps)
    assert torch.equal(back.cond.labels, traj.cond.labels) and back.sampler == traj.sampler
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]


@pytest.mark.parametrize("method", [RTN, SmoothQuant, QuaRot])
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_method_transforms_are_exact_in_fp32(method, kind, dit_adapter, pixart_adapter):
    adapter = dit_adapter if kind == "dit" else pixart_adapter
    traj, stats = _stats(adapter)
    x, t, cond = _inputs(adapter, traj)
    ref = adapter.forward(x, t, cond)
    model = copy.deepcopy(adapter.transformer)
    quant_adapter = get_adapter(model, adapter.caption_encoder)
    qlinears = method(QuantRecipe(wbits=4, abits=4, role_overrides={})).quantize(quant_adapter, stats)
    if method is not RTN:
        assert all(q.smooth is not None or q.rotation is not None for q in qlinears.values())
    _disable_quant(qlinears)
    out = quant_adapter.forward(x, t, cond)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_shared_inputs_get_one_transform(dit_adapter):
    _, stats = _stats(dit_adapter)
    qlinears = SmoothQuant(QuantRecipe(wbits=4, abits=4)).quantize(dit_adapter, stats)
    q, k, v = (qlinears[f"transformer_blocks.0.attn1.to_{c}"] for c in "qkv")
    assert torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, v.smooth)


def test_smoothquant_needs_statistics(dit_adapter):
    with pytest.raises(ValueError, match="needs calibration statistics"):
        SmoothQuant(QuantRecipe()).quantize(dit_adapter, None)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=1.5)


def test_quantization_error_orders_w8a8_below_w4a4(dit_adapter):
    traj, stats = _stats(dit_adapter)
    x, t, cond = _inputs(dit_adapter, traj)
    ref = dit_adapter.forward(x, t, cond)
    errors = {}
    for bits in (8, 4):
        adapter = get_adapter(copy.deepcopy(dit_adapter.transformer))
        RTN(QuantRecipe(wbits=bits, abits=bits, role_overrides={})).quantize(adapter, stats)
        errors[bits] = (adapter.forward(x, t, cond) - ref).pow(2).mean().item()
    assert 0 < errors[8] < errors[4] / 20

"""The DiT PTQ baselines: Q-DiT (group allocation), PTQ4DiT (CSB + SSC) and ViDiT-Q (scaling + rotation)."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from tca_lightning.data.calibration import LinearStats, collect_linear_stats, generate_trajectories
from tca_lightning.methods import QuantRecipe, SmoothQuant
from tca_lightning.methods.ptq4dit import (
    PTQ4DiT,
    csb_scales,
    rank_average,
    spearman_rho,
    ssc_weights,
    weight_salience,
)
from tca_lightning.methods.qdit import (
    QDiT,
    allocate_group_sizes,
    candidate_group_sizes,
    layer_proxy_loss,
    set_group_size,
)
from tca_lightning.methods.viditq import ViDiTQ
from tca_lightning.models.adapters import Condition, get_adapter
from tca_lightning.models.samplers import SamplerConfig
from tca_lightning.quant.linear import QuantLinear

METHODS = [QDiT, PTQ4DiT, ViDiTQ]
KINDS = ["dit", "pixart"]


# --- shared calibration data (built once per module: 2-layer random models, 4 conditions, 3 steps) --------

def _build(kind: str):
    from tca_lightning.models.captions import TinyCaptionEncoder
    from tca_lightning.models.tiny import TINY_PIXART_CONFIG, build_tiny_dit, build_tiny_pixart

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "dit":
            adapter = get_adapter(build_tiny_dit(num_layers=2).eval())
            cond = Condition(labels=torch.arange(4) % 10)
        else:
            encoder = TinyCaptionEncoder(embed_dim=TINY_PIXART_CONFIG["caption_channels"])
            adapter = get_adapter(build_tiny_pixart(num_layers=2).eval(), encoder)
            cond = adapter.encode_captions(["a handwritten seven", "a thick handwritten two",
                                            "a left-leaning handwritten zero", "a handwritten one"])
    traj = generate_trajectories(adapter, cond, list(range(4)), SamplerConfig(num_steps=3), progress=False)
    stats = collect_linear_stats(adapter, traj, gram=True, progress=False)
    step = 1
    x, t = traj.x[step], traj.timesteps[step]
    inputs = (x, t, Condition(labels=traj.cond.labels) if kind == "dit" else traj.cond)
    with torch.no_grad():
        ref = adapter.forward(*inputs)
    return adapter, stats, inputs, ref


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _build(kind)
        return cache[kind]

    return get


def _fresh(adapter):
    return get_adapter(copy.deepcopy(adapter.transformer), adapter.caption_encoder)


def _rel(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _disable_quant(qlinears):
    for q in qlinears.values():
        q.weight_spec = dataclasses.replace(q.weight_spec, bits=16)
        q.act_spec = dataclasses.replace(q.act_spec, bits=16)
        q.unfreeze()


class _OneUnitPerLinear:
    """A stand-in adapter for hand-built layers: every linear reads its own input."""

    def shared_input_groups(self, names):
        return [[n] for n in names]


def _qlinear(name, in_features, out_features, recipe, role="fc1", seed=0, weight_std=None):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features)
    if weight_std is not None:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_features, in_features, generator=g) * weight_std)
            lin.bias.zero_()
    q = QuantLinear.from_float(lin, *recipe.specs(role), name=name)
    q.role = role
    return q


def _stats_of(data: dict[str, torch.Tensor], gram: bool) -> LinearStats:
    """LinearStats of hand-made inputs (T, tokens, C) per linear name."""
    t = next(iter(data.values())).shape[0]
    stats = LinearStats(torch.arange(t))
    for name, x in data.items():
        stats.absmax[name] = x.abs().amax(1)
        if gram:
            flat = x.reshape(-1, x.shape[-1])
            stats.gram[name] = (flat.t() @ flat).double()
            stats.tokens[name] = flat.shape[0]
    return stats


def _layer_error(q: QuantLinear, x: torch.Tensor) -> float:
    """Relative output MSE of a quantized linear against its own FP computation."""
    x = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        ref = x @ q.weight.t() + q.bias
        return ((q(x) - ref).pow(2).sum() / ref.pow(2).sum()).item()


# --- every method, on both architectures -------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_disabled_quantization_is_the_fp_model(method, kind, calibrated):
    adapter, stats, inputs, ref = calibrated(kind)
    quant = _fresh(adapter)
    qlinears = method(QuantRecipe(wbits=16, abits=16, role_overrides={})).quantize(quant, stats)
    assert qlinears and all(isinstance(q, QuantLinear) for q in qlinears.values())
    with torch.no_grad():
        assert _rel(quant.forward(*inputs), ref) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_w4a4_runs_and_its_transforms_are_exact_in_fp32(method, kind, calibrated):
    adapter, stats, inputs, ref = calibrated(kind)
    quant = _fresh(adapter)
    m = method(QuantRecipe(wbits=4, abits=4, role_overrides={}))
    qlinears = m.quantize(quant, stats)
    if method is PTQ4DiT:
        assert all(q.smooth is not None and q.rotation is None for q in qlinears.values())
    elif method is ViDiTQ:
        assert all(q.smooth is not None and q.rotation is not None for q in qlinears.values())
    else:
        assert all(q.weight_spec.granularity == q.act_spec.granularity == "group" for q in qlinears.values())
        assert m.allocation and set(m.allocation) < set(qlinears)
    with torch.no_grad():
        out = quant.forward(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _rel(out, ref) > 1e-3  # W4A4 really quantizes
    _disable_quant(qlinears)
    with torch.no_grad():
        assert _rel(quant.forward(*inputs), ref) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_default_recipe_end_to_end_outputs_are_finite(method, kind, calibrated):
    adapter, stats, inputs, ref = calibrated(kind)
    quant = _fresh(adapter)
    qlinears = method(QuantRecipe(wbits=4, abits=4)).quantize(quant, stats)
    assert {q.weight_spec.bits for q in qlinears.values()} == {4, 8}  # embedders/final stay at 8 bits
    with torch.no_grad():
        out = quant.forward(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_methods_need_statistics_and_name_what_is_missing(method, calibrated):
    adapter, stats, _, _ = calibrated("dit")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        method(QuantRecipe(wbits=4, abits=4)).quantize(_fresh(adapter), None)
    partial = LinearStats(stats.timesteps, {k: v for k, v in stats.absmax.items() if "ff.net.2" not in k})
    with pytest.raises(ValueError, match=r"no absmax for transformer_blocks\.\d\.ff\.net\.2"):
        method(QuantRecipe(wbits=4, abits=4)).quantize(_fresh(adapter), partial)
    wrong = LinearStats(stats.timesteps, {k: v[:, :-1] for k, v in stats.absmax.items()})
    with pytest.raises(ValueError, match="must have shape"):
        method(QuantRecipe(wbits=4, abits=4)).quantize(_fresh(adapter), wrong)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        ViDiTQ(alpha=1.5)
    with pytest.raises(ValueError, match="act_stat"):
        ViDiTQ(act_stat="median")
    with pytest.raises(ValueError, match="tau"):
        PTQ4DiT(tau=0)
    with pytest.raises(ValueError, match="group_sizes"):
        QDiT(group_sizes=())
    with pytest.raises(ValueError, match="group_sizes"):
        QDiT(group_sizes=(0, 64))
    with pytest.raises(ValueError, match="target_group_size"):
        QDiT(target_group_size=0)


# --- PTQ4DiT -----------------------------------------------------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 40), generator=g).float()  # many ties
    b = torch.randn(40, generator=g)
    b[:5] = b[5]
    ours = spearman_rho(a, b)
    for t in range(5):
        assert ours[t].item() == pytest.approx(stats.spearmanr(a[t].numpy(), b.numpy()).statistic, abs=1e-6)
    assert torch.equal(rank_average(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([2.5, 0.0, 2.5, 1.0],
                                                                                    dtype=torch.float64))
    assert spearman_rho(torch.ones(1, 8), b[:8]).item() == 0.0  # a constant profile correlates with nothing


def test_ssc_weights_are_a_distribution_favouring_low_correlation():
    w_sal = torch.arange(1.0, 9.0)
    act = torch.stack([
        w_sal * 2,                                                   # rho = +1: salience already coincides
        w_sal.flip(0),                                               # rho = -1: perfectly complementary
        torch.tensor([5.0, 1.0, 7.0, 2.0, 8.0, 3.0, 6.0, 4.0]),      # in between
    ])
    rho = spearman_rho(act, w_sal)
    assert rho[0].item() == pytest.approx(1.0) and rho[1].item() == pytest.approx(-1.0)
    assert -1 < rho[2].item() < 1
    eta = ssc_weights(act, w_sal)
    assert (eta > 0).all() and eta.sum().item() == pytest.approx(1.0)
    assert eta[1] > eta[2] > eta[0]
    assert torch.allclose(eta, torch.softmax(-rho, 0))
    sharper = ssc_weights(act, w_sal, tau=0.1)
    assert sharper[1] > eta[1]  # a lower temperature concentrates on the least correlated timestep


def test_csb_balances_activation_and_weight_salience():
    g = torch.Generator().manual_seed(0)
    act_sal = torch.rand(32, generator=g) * 50 + 0.1
    weight = torch.randn(16, 32, generator=g)
    w_sal = weight_salience(weight)
    b = csb_scales(act_sal, w_sal)
    assert torch.allclose(act_sal / b, w_sal * b, rtol=1e-5)
    assert torch.allclose(act_sal / b, (act_sal * w_sal).sqrt(), rtol=1e-5)
    assert torch.allclose(weight_salience(weight * b), w_sal * b)  # W' = W B scales column j by b_j


def test_ptq4dit_balances_every_shared_input_with_ssc_weighted_salience(calibrated):
    adapter, stats, _, _ = calibrated("pixart")
    quant = _fresh(adapter)
    m = PTQ4DiT(QuantRecipe(wbits=4, abits=4, role_overrides={}))
    qlinears = m.quantize(quant, stats)
    groups = quant.shared_input_groups(list(qlinears))
    assert any(len(g) == 3 for g in groups) and any(len(g) == 2 for g in groups)  # q/k/v and cross k/v
    for group in groups:
        b = qlinears[group[0]].smooth
        assert all(torch.equal(qlinears[n].smooth, b) for n in group)
        eta = m.timestep_weights[group[0]]
        assert eta.shape == (len(stats.timesteps),) and eta.sum().item() == pytest.approx(1.0)
        act_sal = (eta[:, None] * stats.absmax[group[0]]).sum(0).clamp_min(1e-5)
        w_sal = weight_salience(torch.cat([qlinears[n].weight for n in group])).clamp_min(1e-5)
        assert torch.allclose(act_sal / b, w_sal * b, rtol=1e-4)


# --- Q-DiT -------------------------------------------------------------------------------------------------

def test_candidate_group_sizes_are_divisors():
    assert candidate_group_sizes(256, (128, 32, 64, 48)) == [32, 64, 128]
    assert candidate_group_sizes(96, (32, 64, 128)) == [32]
    with pytest.raises(ValueError, match="none of the candidate group sizes .* divides in_features 200 of blk.fc2"):
        candidate_group_sizes(200, (32, 64, 128), "blk.fc2")


def test_allocation_is_the_exact_optimum_under_the_budget():
    g = torch.Generator().manual_seed(0)
    menus = [[32, 64, 128], [32, 64], [32, 64, 128], [64, 128], [32, 64, 128, 192]]
    options = [{s: torch.rand(1, generator=g).item() / s ** 0.5 + 0.01 * i for s in menu}
               for i, menu in enumerate(menus)]
    for target in (32, 64, 80, 100):
        chosen = allocate_group_sizes(options, target)
        assert all(c in o for c, o in zip(chosen, options))
        assert sum(chosen) / len(chosen) >= target
        feasible = [c for c in itertools.product(*options) if sum(c) / len(c) >= target]
        best = min(sum(o[s] for o, s in zip(options, c)) for c in feasible)
        assert sum(o[s] for o, s in zip(options, chosen)) == pytest.approx(best)
    with pytest.raises(ValueError, match="budget unreachable"):
        allocate_group_sizes(options, 150)


def test_qdit_allocation_on_a_model_respects_budget_and_divisibility(calibrated):
    adapter, stats, _, _ = calibrated("pixart")
    quant = _fresh(adapter)
    m = QDiT(QuantRecipe(wbits=4, abits=4, group_size=64), group_sizes=(32, 64, 128, 96, 48))
    qlinears = m.quantize(quant, stats)
    units = m.searched_units(quant, qlinears)
    assert {qlinears[u[0]].role for u in units} == {"qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "fc1", "fc2"}
    chosen = []
    for unit in units:
        sizes = {m.allocation[n] for n in unit}
        assert len(sizes) == 1  # one group size per shared input
        chosen.append(sizes.pop())
        for n in unit:
            q = qlinears[n]
            assert q.in_features % m.allocation[n] == 0
            assert q.weight_spec.group_size == q.act_spec.group_size == m.allocation[n]
    assert sum(chosen) / len(chosen) >= 64
    assert set(chosen) <= {32, 48, 64, 96, 128}
    with pytest.raises(ValueError, match="budget unreachable"):  # 64-wide inputs cap at 64: the mean cannot reach 96
        QDiT(QuantRecipe(wbits=4, abits=4), target_group_size=96).quantize(_fresh(adapter), stats)


def test_qdit_without_search_keeps_the_uniform_recipe_group_size(calibrated):
    adapter, _, inputs, ref = calibrated("dit")
    quant = _fresh(adapter)
    qlinears = QDiT(QuantRecipe(wbits=4, abits=4, group_size=32), allocate=False).quantize(quant, None)
    assert {(q.weight_spec.granularity, q.act_spec.granularity) for q in qlinears.values()} == {("group", "group")}
    assert {q.weight_spec.group_size for q in qlinears.values()} == {32}
    with torch.no_grad():
        assert torch.isfinite(quant.forward(*inputs)).all()


def test_qdit_weight_proxy_is_the_exact_output_error_given_the_gram_matrix():
    from tca_lightning.quant.transforms import random_hadamard

    recipe = QDiT(QuantRecipe(wbits=4, abits=16, group_size=32)).recipe  # weights only: the proxy is exact
    q = _qlinear("layer", 64, 48, recipe, weight_std=0.1)
    g = torch.Generator().manual_seed(3)
    q.set_transform(smooth=torch.rand(64, generator=g) + 0.5, rotation=random_hadamard(64, seed=1))  # any transform
    x = torch.randn(2, 100, 64, generator=g) * (torch.rand(64, generator=g) * 4 + 0.1)
    stats = _stats_of({"layer": x}, gram=True)
    for size in (16, 32, 64):
        set_group_size(q, size)
        proxy = layer_proxy_loss(q, stats.absmax["layer"], size, stats.gram["layer"])
        assert proxy == pytest.approx(_layer_error(q, x), rel=1e-4)


def _heterogeneous_inputs(seed: int, steps: int = 4, tokens: int = 256, channels: int = 256):
    """Two layers' inputs: one with ranges alternating 1x / 8x in blocks of 32 channels, one homogeneous."""
    g = torch.Generator().manual_seed(seed)
    ranges = torch.ones(channels)
    ranges.view(-1, 32)[1::2] = 8.0
    return {"het": torch.randn(steps, tokens, channels, generator=g) * ranges,
            "hom": torch.randn(steps, tokens, channels, generator=g)}


@pytest.mark.parametrize("gram", [True, False])
def test_qdit_beats_uniform_grouping_on_heterogeneous_channel_ranges(gram):
    recipe = QDiT(QuantRecipe(wbits=4, abits=4, group_size=64)).recipe
    qlinears = {n: _qlinear(n, 256, 64, recipe, role="fc2", seed=i, weight_std=0.05)
                for i, n in enumerate(("het", "hom"))}
    m = QDiT(QuantRecipe(wbits=4, abits=4, group_size=64))
    m.calibrate(_OneUnitPerLinear(), qlinears, _stats_of(_heterogeneous_inputs(0), gram=gram))
    assert m.allocation == {"het": 32, "hom": 128}  # fine groups where ranges vary, coarse where they do not
    held_out = _heterogeneous_inputs(1)
    searched = sum(_layer_error(q, held_out[n]) for n, q in qlinears.items())
    for q in qlinears.values():
        set_group_size(q, 64)
    uniform = sum(_layer_error(q, held_out[n]) for n, q in qlinears.items())
    assert searched <= uniform


# --- ViDiT-Q -----------------------------------------------------------------------------------------------

def _time_varying_outliers(seed: int, steps: int = 4, tokens: int = 128, channels: int = 64):
    """Inputs with two static outlier channels and two more that move with the timestep."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for t in range(steps):
        ranges = torch.ones(channels)
        ranges[[3, 40]] = 20.0
        ranges[[10 + 7 * t, 11 + 7 * t]] = 30.0
        xs.append(torch.randn(tokens, channels, generator=g) * ranges)
    return torch.stack(xs)


def test_viditq_beats_smoothquant_on_time_varying_outliers():
    recipe = QuantRecipe(wbits=4, abits=4, role_overrides={})
    stats = _stats_of({"layer": _time_varying_outliers(0)}, gram=False)
    held_out = _time_varying_outliers(1)
    errors = {}
    for method in (SmoothQuant, ViDiTQ):
        q = _qlinear("layer", 64, 96, recipe, weight_std=0.1)
        method(recipe).calibrate(_OneUnitPerLinear(), {"layer": q}, stats)
        errors[method.__name__] = _layer_error(q, held_out)
    assert errors["ViDiTQ"] < errors["SmoothQuant"]


def test_viditq_sets_smoothquant_scales_then_an_orthogonal_rotation(calibrated):
    adapter, stats, _, _ = calibrated("dit")
    quant = _fresh(adapter)
    qlinears = ViDiTQ(QuantRecipe(wbits=4, abits=4, role_overrides={}), alpha=0.3).quantize(quant, stats)
    q = qlinears["transformer_blocks.0.ff.net.2"]
    expected = (stats.absmax[q.name].amax(0).clamp_min(1e-5).pow(0.3)
                / q.weight.abs().amax(0).clamp_min(1e-5).pow(0.7)).clamp_min(1e-5)
    assert torch.allclose(q.smooth, expected, rtol=1e-5)
    eye = torch.eye(q.in_features)
    assert torch.allclose(q.rotation @ q.rotation.t(), eye, atol=1e-5)
    qkv = [qlinears[f"transformer_blocks.1.attn1.to_{c}"] for c in "qkv"]
    assert all(torch.equal(x.rotation, qkv[0].rotation) and torch.equal(x.smooth, qkv[0].smooth) for x in qkv)
    fc1 = qlinears["transformer_blocks.1.ff.net.0.proj"]
    assert not torch.equal(qkv[0].rotation, fc1.rotation)  # one draw per shared input

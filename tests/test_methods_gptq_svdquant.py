"""GPTQ and SVDQuant: better than round-to-nearest where they should be, exact where they must be,
on the quantizer's own grid, and end to end on a 2-layer random tiny DiT."""

from __future__ import annotations

import copy

import pytest
import torch

from tca_lightning.methods import QuantRecipe, RTN, SmoothQuant
from tca_lightning.methods.gptq import GPTQ, gptq_quantize, layer_hessian, store_quantized_weight
from tca_lightning.quant.transforms import (transform_gram,
                                        unfold_input_transform)
from tca_lightning.methods.svdquant import SVDQuant, apply_svdquant, lowrank_rank
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec, dequantize, fake_quant, qrange, quantize
from tca_lightning.quant.transforms import fold_input_transform, random_hadamard, smoothquant_scales, transform_input

OFF = QuantSpec(bits=16)
A4 = QuantSpec(bits=4, granularity="token", symmetric=False)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def correlated_inputs(n=512, k=128, seed=0):
    """Tokens whose channels are correlated and of different scales (what makes GPTQ beat RTN)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix * torch.logspace(-0.5, 0.5, k)


def gram_of(x):
    return x.double().t() @ x.double()


class _Stats:
    """The two LinearStats fields GPTQ reads, for one layer."""

    def __init__(self, name, x):
        self.gram, self.tokens = {name: gram_of(x)}, {name: x.shape[0]}


# --- GPTQ: the algorithm -------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_stays_on_the_grid(granularity, bits, act_order):
    torch.manual_seed(bits)
    x, w = correlated_inputs(), torch.randn(32, 128)
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=32)
    r = gptq_quantize(w, 2 * gram_of(x) / len(x), spec, block_size=48, act_order=act_order)  # blocks cross groups
    err = lambda wq: (x @ (w - wq).t()).pow(2).sum().item()  # noqa: E731
    assert err(r.weight) < 0.9 * err(fake_quant(w, spec)), (err(r.weight), err(fake_quant(w, spec)))
    codes = quantize(r.weight, r.scale, r.zero, spec)
    assert torch.equal(dequantize(codes, r.scale, r.zero, w.shape), r.weight)  # every value is a grid point
    qmin, qmax = qrange(bits, True)
    assert torch.equal(codes, codes.round()) and codes.min() >= qmin and codes.max() <= qmax
    assert r.scale.shape == ((32, 4, 1) if granularity == "group" else (32, 1))


def test_gptq_lazy_blocks_do_not_change_the_result():
    x, w = correlated_inputs(k=64), torch.randn(16, 64)
    h, spec = 2 * gram_of(x) / len(x), QuantSpec(bits=4)
    one, many = gptq_quantize(w, h, spec, block_size=1), gptq_quantize(w, h, spec, block_size=128)
    assert torch.equal(one.scale, many.scale)
    assert (one.weight != many.weight).float().mean() < 0.01  # float-order ties only


def test_gptq_dead_inputs_get_zero_weight_columns():
    x, w = correlated_inputs(k=64), torch.randn(16, 64)
    x[:, [5, 9]] = 0
    r = gptq_quantize(w, 2 * gram_of(x) / len(x), QuantSpec(bits=4))
    assert (r.weight[:, [5, 9]] == 0).all() and torch.isfinite(r.weight).all()


@pytest.mark.parametrize("parts", ["smooth", "rotation", "perm", "all"])
def test_transform_gram_equals_the_gram_of_the_transformed_input(parts):
    torch.manual_seed(0)
    x = torch.randn(300, 64, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)
    every = {"smooth": torch.rand(64, dtype=torch.float64) + 0.2,
             "rotation": random_hadamard(64, 3, dtype=torch.float64), "perm": torch.randperm(64)}
    kw = every if parts == "all" else {parts: every[parts]}
    xt = transform_input(x, **kw)
    assert rel_err(transform_gram(x.t() @ x, **kw), xt.t() @ xt) <= 1e-5


def test_unfold_inverts_fold():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    kw = {"smooth": torch.rand(64) + 0.2, "rotation": random_hadamard(64, 1), "perm": torch.randperm(64)}
    assert rel_err(fold_input_transform(unfold_input_transform(w, **kw), **kw), w) <= 1e-5


# --- GPTQ: on a QuantLinear ------------------------------------------------------------------------

def test_gptq_on_a_transformed_layer_with_lowrank_beats_rtn_and_forward_uses_its_exact_weight():
    torch.manual_seed(0)
    x, lin = correlated_inputs(k=64), torch.nn.Linear(64, 32)
    spec = QuantSpec(bits=3, granularity="group", group_size=16)
    parts = dict(smooth=torch.rand(64) + 0.5, rotation=random_hadamard(64, 2), perm=torch.randperm(64))

    def layer():
        q = QuantLinear.from_float(lin, spec, OFF, name="blk.fc")
        q.set_transform(**parts)
        q.set_lowrank(torch.randn(64, 2) * 0.1, torch.randn(2, 32) * 0.1)
        return q

    rtn, gq = layer(), layer()
    r = GPTQ(block_size=16).quantize_linear(gq, layer_hessian(gq, _Stats("blk.fc", x), "blk.fc"))
    ref = lin(x)
    err = lambda q: (q(x) - ref).pow(2).sum().item()  # noqa: E731
    assert err(gq) < 0.9 * err(rtn)
    assert torch.equal(gq.quantized_weight(), r.weight)
    # the stored FP weight is GPTQ's weight in the original basis
    assert rel_err(gq.transformed_weight(), r.weight) <= 1e-5
    xt = transform_input(x, **parts)
    y = xt @ r.weight.t() + lin.bias + (xt @ gq.lowrank_a) @ gq.lowrank_b
    assert rel_err(gq(x), y) <= 1e-5


def test_gptq_with_weight_quantization_off_leaves_the_layer_exact():
    torch.manual_seed(0)
    x, lin = correlated_inputs(k=64), torch.nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, OFF, OFF, name="blk.fc")
    q.set_transform(smooth=torch.rand(64) + 0.5, rotation=random_hadamard(64, 2))
    before = q.weight.clone()
    assert GPTQ().quantize_linear(q, layer_hessian(q, _Stats("blk.fc", x), "blk.fc")) is None
    assert torch.equal(q.weight, before) and rel_err(q(x), lin(x)) <= 1e-5
    # storing an (unquantized) weight round-trips exactly too
    store_quantized_weight(q, q.transformed_weight())
    assert rel_err(q(x), lin(x)) <= 1e-5


def test_gptq_bad_inputs_name_the_layer():
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), QuantSpec(bits=4), OFF, name="blk.fc")
    no_gram = _Stats("other", torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"Gram matrix of blk.fc.*gram=True"):
        layer_hessian(q, no_gram, "blk.fc")
    wrong = _Stats("blk.fc", torch.randn(8, 48))
    with pytest.raises(ValueError, match=r"Gram matrix of blk.fc has shape \(48, 48\)"):
        layer_hessian(q, wrong, "blk.fc")
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64 of blk.fc"):
        gptq_quantize(q.weight, torch.eye(64), QuantSpec(bits=4, granularity="group", group_size=48), name="blk.fc")
    with pytest.raises(ValueError, match="block_size"):
        GPTQ(block_size=0)


# --- SVDQuant --------------------------------------------------------------------------------------

def outlier_layer():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, [3, 17, 40, 55]] *= 40
    return x, torch.nn.Linear(64, 64)


def test_svdquant_is_exact_with_quantization_off():
    x, lin = outlier_layer()
    q = QuantLinear.from_float(lin, OFF, OFF)
    apply_svdquant(q, rank=8, smooth=smoothquant_scales(x.abs().amax(0), lin.weight))
    assert q.lowrank_a.shape == (64, 8) and q.lowrank_b.shape == (8, 64)
    assert (q(x) - transform_input(x, q.smooth) @ q.lowrank_a @ q.lowrank_b).abs().max() > 0.1  # the branch is live
    assert rel_err(q(x), lin(x)) <= 1e-5


def test_svdquant_lowrank_is_the_top_singular_part_of_the_smoothed_weight():
    x, lin = outlier_layer()
    q = QuantLinear.from_float(lin, OFF, OFF)
    apply_svdquant(q, rank=4, smooth=smoothquant_scales(x.abs().amax(0), lin.weight))
    w_s = fold_input_transform(lin.weight, q.smooth)
    s = torch.linalg.svdvals(w_s.double())
    residual = torch.linalg.svdvals(q.transformed_weight().double())
    assert torch.allclose(residual[:60], s[4:], rtol=1e-4, atol=1e-5)  # Eckart-Young: the rest is untouched


def test_svdquant_w4a4_beats_rtn_and_smoothquant_on_outlier_inputs():
    x, lin = outlier_layer()
    ref, w4 = lin(x), QuantSpec(bits=4)
    err = lambda q: ((q(x) - ref).pow(2).sum() / ref.pow(2).sum()).item()  # noqa: E731
    s = smoothquant_scales(x.abs().amax(0), lin.weight, 0.5)
    rtn = QuantLinear.from_float(lin, w4, A4)
    smooth = QuantLinear.from_float(lin, w4, A4)
    smooth.set_transform(smooth=s)
    svd = QuantLinear.from_float(lin, w4, A4)
    apply_svdquant(svd, rank=4, smooth=s)
    assert err(svd) < 0.5 * err(smooth) and err(smooth) < err(rtn), (err(svd), err(smooth), err(rtn))


def test_rank_scales_with_width():
    assert lowrank_rank(32, 1152, 1152) == 32 and lowrank_rank(32, 1152, 4608) == 32
    assert lowrank_rank(32, 4608, 1152) == 32 and lowrank_rank(32, 64, 384) == 2
    assert lowrank_rank(32, 256, 64) == 2 and lowrank_rank(32, 16, 16) == 1 and lowrank_rank(64, 64, 64) == 4
    assert lowrank_rank(32, 64, 64, scale_to_width=False) == 32 and lowrank_rank(32, 16, 8, False) == 8
    with pytest.raises(ValueError, match="rank"):
        SVDQuant(rank=0)


# --- end to end on a 2-layer random tiny DiT ------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated():
    """(FP model, stats with Gram matrices) from 4 conditions x 3 DDIM steps with guidance."""
    from tca_lightning.data.calibration import collect_linear_stats, generate_trajectories
    from tca_lightning.models.adapters import Condition, get_adapter
    from tca_lightning.models.samplers import SamplerConfig
    from tca_lightning.models.tiny import build_tiny_dit

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_tiny_dit(num_layers=2).eval()
    adapter = get_adapter(model)
    traj = generate_trajectories(adapter, Condition(labels=torch.arange(4)), range(4), SamplerConfig(num_steps=3),
                                 progress=False)
    return model, collect_linear_stats(adapter, traj, gram=True, progress=False)


def run_method(method, calibrated, make_inputs):
    from tca_lightning.models.adapters import get_adapter

    model, stats = calibrated
    adapter = get_adapter(copy.deepcopy(model))
    x, t, cond = make_inputs(adapter, 2)
    with torch.no_grad():
        ref = adapter.forward(x, t, cond)
        qlinears = method.quantize(adapter, stats)
        out = adapter.forward(x, t, cond)
    assert torch.isfinite(out).all()
    return qlinears, ((out - ref).norm() / ref.norm()).item()


def test_gptq_end_to_end_on_smoothquant(calibrated, make_inputs):
    recipe = QuantRecipe(wbits=4, abits=8, weight_granularity="group", group_size=32)
    method = GPTQ(recipe, block_size=32, base=SmoothQuant(alpha=0.5))
    assert method.needs_stats == ("gram", "absmax")
    qlinears, err = run_method(method, calibrated, make_inputs)
    _, err_rtn = run_method(RTN(recipe), calibrated, make_inputs)
    assert set(method.results) == set(qlinears) and len(qlinears) > 8
    for name, q in qlinears.items():
        r = method.results[name]
        assert q.smooth is not None, name
        assert torch.equal(q.quantized_weight(), r.weight), name  # freeze kept GPTQ's weight
        spec = q.weight_spec
        assert torch.equal(dequantize(quantize(r.weight, r.scale, r.zero, spec), r.scale, r.zero, r.weight.shape),
                           r.weight), name
    assert err < 0.6 * err_rtn and err < 0.1, (err, err_rtn)  # relative error 1 = an all-zero output


def test_svdquant_end_to_end(calibrated, make_inputs):
    recipe = QuantRecipe(wbits=4, abits=4)
    qlinears, err = run_method(SVDQuant(recipe), calibrated, make_inputs)
    _, err_rtn = run_method(RTN(recipe), calibrated, make_inputs)
    for name, q in qlinears.items():
        assert q.smooth is not None and q.lowrank_a is not None, name
        assert q.lowrank_a.shape[1] == lowrank_rank(32, q.in_features, q.out_features), name
    assert err < err_rtn and err < 0.1, (err, err_rtn)  # relative error 1 = an all-zero output


def test_gptq_without_gram_statistics_says_what_to_do(calibrated, make_inputs):
    from tca_lightning.data.calibration import LinearStats
    from tca_lightning.models.adapters import get_adapter

    model, stats = calibrated
    no_gram = LinearStats(stats.timesteps, absmax=stats.absmax)
    with pytest.raises(ValueError, match=r"Gram matrix of transformer_blocks\.0\..*gram=True"):
        GPTQ(QuantRecipe(wbits=4)).quantize(get_adapter(copy.deepcopy(model)), no_gram)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        GPTQ(QuantRecipe(wbits=4)).quantize(get_adapter(copy.deepcopy(model)), None)

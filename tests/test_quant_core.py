"""Quantizers, transforms and QuantLinear: error bounds, STE gradients, exactness of every fold."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import (QuantSpec, choose_qparams, dequantize, fake_quant, fake_quant_static,
                                            qrange, quantize, search_clip_ratio, sqnr_db)
from tca_lightning.quant.transforms import (apply_kron, fold_input_transform, hadamard, invert_permutation,
                                            kron_factors, random_hadamard, smoothquant_scales, transform_input)

OFF = QuantSpec(bits=16)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(bits, granularity, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(16, 128) * torch.linspace(0.1, 10, 128)
    spec = QuantSpec(bits=bits, granularity=granularity, group_size=32, symmetric=symmetric)
    scale, zero = choose_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    qmin, qmax = qrange(bits, symmetric)
    assert q.min() >= qmin and q.max() <= qmax and torch.equal(q, q.round())
    x_hat = dequantize(q, scale, zero, x.shape)
    step = scale.expand_as(q).reshape(x.shape)
    # Without clipping every value lies inside the grid's range: error <= step / 2 (+ float slack).
    assert ((x_hat - x).abs() <= step / 2 + 1e-5 * x.abs().max()).all()
    assert torch.allclose(fake_quant(x, spec), x_hat, atol=1e-6)


def test_sqnr_grows_about_6db_per_bit_and_finer_granularity_helps():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    per_bits = [sqnr_db(w, fake_quant(w, QuantSpec(bits=b, granularity="channel"))) for b in (4, 5, 6, 7, 8)]
    gains = [b - a for a, b in zip(per_bits, per_bits[1:])]
    assert all(5.0 < g < 7.0 for g in gains), gains
    coarse = sqnr_db(w, fake_quant(w, QuantSpec(bits=4, granularity="tensor")))
    channel = sqnr_db(w, fake_quant(w, QuantSpec(bits=4, granularity="channel")))
    group = sqnr_db(w, fake_quant(w, QuantSpec(bits=4, granularity="group", group_size=32)))
    assert coarse < channel < group


def test_token_granularity_scales_each_row_alone():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.25], [100.0, 50.0, -25.0, 12.5]])
    y = fake_quant(x, QuantSpec(bits=8, granularity="token"))
    # row 0 is not flattened by row 1's large range
    assert (y[0] - x[0]).abs().max() < 2.0 / 127


def test_ste_passes_gradients_inside_the_range_and_blocks_them_outside():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.3, 0.9, 5.0], requires_grad=True)
    scale = torch.tensor(1.0 / 7)  # 4-bit symmetric grid covers [-8/7, 1]
    fake_quant_static(x, scale, QuantSpec(bits=4)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_learnable_clip_ratio_gets_a_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    ratio = torch.full((8, 1), 0.9, requires_grad=True)
    loss = (fake_quant(w, QuantSpec(bits=3, granularity="channel"), ratio) - w).pow(2).sum()
    loss.backward()
    assert ratio.grad is not None and ratio.grad.abs().sum() > 0


def test_clip_search_finds_a_ratio_below_one_for_heavy_tails():
    torch.manual_seed(0)
    x = torch.randn(1, 4096)
    x[0, :4] = 8.0  # a few outliers waste the grid
    heavy = search_clip_ratio(x, QuantSpec(bits=4, granularity="tensor"))
    light = search_clip_ratio(torch.linspace(-1, 1, 4096)[None], QuantSpec(bits=4, granularity="tensor"))
    assert heavy < light <= 1.0
    best = fake_quant(x, QuantSpec(bits=4, granularity="tensor", clip_ratio=heavy))
    assert (best - x).pow(2).mean() < (fake_quant(x, QuantSpec(bits=4, granularity="tensor")) - x).pow(2).mean()


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits"), ({"bits": 12}, "bits"), ({"granularity": "row"}, "granularity"),
    ({"group_size": 0}, "group_size"), ({"clip_ratio": 1.5}, "clip_ratio"),
])
def test_bad_specs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_size_must_divide_in_features_with_a_named_error():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 200 of blocks.3.fc2"):
        QuantLinear.from_float(torch.nn.Linear(200, 8), QuantSpec(bits=4, granularity="group", group_size=64), OFF,
                               name="blocks.3.fc2")


# --- transforms --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 12, 64, 96, 1152, 4608])
def test_hadamard_is_orthogonal_for_any_order(n):
    h = hadamard(n, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_power_of_two_hadamard_is_plus_minus_one_over_sqrt_n():
    h = hadamard(64)
    assert torch.allclose(h.abs(), torch.full((64, 64), 64 ** -0.5))
    r = random_hadamard(64, seed=3)
    assert torch.allclose(r @ r.t(), torch.eye(64), atol=1e-5) and not torch.allclose(r, h)


@pytest.mark.parametrize("n", [64, 256, 1152, 4608])
def test_kron_factor_application_equals_the_dense_kronecker_product(n):
    a, b = kron_factors(n)
    assert a * b == n and a <= b
    torch.manual_seed(0)
    left, right = random_hadamard(a, 1, dtype=torch.float64), random_hadamard(b, 2, dtype=torch.float64)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(apply_kron(x, left, right), x @ torch.kron(left, right), atol=1e-10)


def test_every_input_transform_fold_is_exact():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(10, 64) * torch.logspace(-1, 1, 64)
    s, r, p = torch.rand(64) + 0.2, random_hadamard(64, 5), torch.randperm(64)
    kron = (random_hadamard(8, 6), torch.linalg.qr(torch.randn(8, 8))[0])  # a non-contiguous factor too
    for parts in ({"smooth": s}, {"rotation": r}, {"perm": p}, {"smooth": s, "rotation": r, "perm": p},
                  {"rotation": kron}, {"smooth": s, "rotation": kron, "perm": p}):
        y = transform_input(x, **parts) @ fold_input_transform(w, **parts).t()
        assert rel_err(y, x @ w.t()) <= 1e-5, parts


def test_a_kronecker_rotation_equals_its_dense_matrix_in_every_transform():
    """The Kronecker pair is only a storage and speed form: gram, fold, unfold and input agree with kron(a, b)."""
    from tca_lightning.quant.transforms import rotation_matrix, transform_gram, unfold_input_transform

    torch.manual_seed(0)
    k = 96  # 8 x 12: unequal factors
    pair = (random_hadamard(8, 1, dtype=torch.float64), torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0])
    dense = rotation_matrix(pair)
    x, w = torch.randn(40, k, dtype=torch.float64), torch.randn(20, k, dtype=torch.float64)
    s, p = torch.rand(k, dtype=torch.float64) + 0.5, torch.randperm(k)
    assert torch.allclose(transform_input(x, s, pair, p), transform_input(x, s, dense, p), atol=1e-12)
    assert torch.allclose(fold_input_transform(w, s, pair, p), fold_input_transform(w, s, dense, p), atol=1e-12)
    g = x.t() @ x
    assert torch.allclose(transform_gram(g, s, pair, p), transform_gram(g, s, dense, p), rtol=1e-10, atol=1e-9)
    assert torch.allclose(unfold_input_transform(fold_input_transform(w, s, pair, p), s, pair, p), w, atol=1e-10)


def test_folds_stay_exact_for_fp16_rounded_kronecker_factors_that_are_not_orthogonal():
    """ARC.bake stores FP16 values: R16 R16^T != I by ~1e-3, so the weight side takes (A ⊗ B)^-T, not A ⊗ B."""
    from tca_lightning.quant.transforms import fp16_values, unfold_input_transform

    torch.manual_seed(0)
    pair = tuple(fp16_values(torch.linalg.qr(torch.randn(n, n))[0]) for n in (8, 12))
    assert max(float((f.t() @ f - torch.eye(len(f))).abs().max()) for f in pair) > 1e-4
    linear = torch.nn.Linear(96, 20)
    q = QuantLinear.from_float(linear, OFF, OFF)
    q.set_transform(smooth=fp16_values(torch.rand(96) + 0.5), rotation=pair, perm=torch.randperm(96))
    x = torch.randn(40, 96)
    assert rel_err(q(x), linear(x)) <= 1e-5
    orthogonal_fold = linear.weight * q.smooth  # what W (A ⊗ B) would give: off by the factors' rounding
    orthogonal_fold = apply_kron(orthogonal_fold, *pair)[:, q.perm]
    naive = transform_input(x, q.smooth, pair, q.perm) @ orthogonal_fold.t() + linear.bias
    assert rel_err(naive, linear(x)) > 1e-4
    w_t = fold_input_transform(linear.weight.double(), q.smooth.double(), tuple(f.double() for f in pair), q.perm)
    back = unfold_input_transform(w_t, q.smooth.double(), tuple(f.double() for f in pair), q.perm)
    assert torch.allclose(back, linear.weight.double(), atol=1e-10)


def test_a_quant_linear_keeps_a_kronecker_rotation_factored_and_rejects_bad_factors():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    q = QuantLinear.from_float(linear, OFF, OFF, name="blk.0.fc1")
    q.set_transform(rotation=random_hadamard(64, 0))
    q.set_transform(rotation=(random_hadamard(8, 1), random_hadamard(8, 2)))  # replaces the dense one
    assert q.rotation is None and isinstance(q.input_rotation, tuple)
    x = torch.randn(3, 64)
    assert rel_err(q(x), linear(x)) <= 1e-5
    fresh = QuantLinear.from_float(linear, OFF, OFF)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match=r"orders 8 x 4 = 32, expected in_features 64"):
        q.set_transform(rotation=(torch.eye(8), torch.eye(4)))
    with pytest.raises(ValueError, match="right Kronecker factor of blk.0.fc1's rotation must be square"):
        q.set_transform(rotation=(torch.eye(8), torch.eye(8, 4)))


def test_permutation_inverse():
    p = torch.randperm(50)
    assert torch.equal(p[invert_permutation(p)], torch.arange(50))


def test_smoothquant_scales_balance_activation_and_weight_ranges():
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    act = torch.logspace(-1, 2, 16)
    s = smoothquant_scales(act, w, alpha=0.5)
    # alpha = 0.5: the smoothed activation and weight column ranges become equal
    assert torch.allclose(act / s, w.abs().amax(0) * s, rtol=1e-4)


# --- QuantLinear --------------------------------------------------------------------------------

def test_quant_linear_with_all_parts_is_exact_when_quantization_is_off():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = QuantLinear.from_float(linear, OFF, OFF)
    q.set_transform(smooth=torch.rand(64) + 0.5, rotation=random_hadamard(64, 1), perm=torch.randperm(64))
    q.set_lowrank(torch.randn(64, 4) * 0.1, torch.randn(4, 32) * 0.1)
    x = torch.randn(7, 64)
    assert isinstance(q, torch.nn.Linear)
    assert rel_err(q(x), linear(x)) <= 1e-5


def test_quant_linear_freeze_caches_the_same_weight_and_set_transform_invalidates_it():
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), QuantSpec(bits=4), QuantSpec(bits=8, granularity="token"))
    x = torch.randn(3, 64)
    before = q(x)
    q.freeze()
    assert torch.equal(q(x), before)
    q.set_transform(rotation=random_hadamard(64, 0))
    assert q._frozen_weight is None and not torch.equal(q(x), before)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_in_place_sampling_path_of_fake_quant_equals_the_ste_path_bit_for_bit(granularity, symmetric):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity=granularity, group_size=16, symmetric=symmetric, clip_ratio=0.9)
    x = torch.randn(6, 32, 64) * torch.rand(64) * 3
    with torch.no_grad():
        fast = fake_quant(x, spec)
    ste = fake_quant(x.clone().requires_grad_(True), spec)
    assert ste.requires_grad and torch.equal(fast, ste.detach())


def test_freeze_fuses_smooth_kronecker_rotation_and_permutation_into_one_input_map():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = QuantLinear.from_float(linear, OFF, OFF)
    left, right = torch.linalg.qr(torch.randn(8, 8))[0], torch.linalg.qr(torch.randn(8, 8))[0]
    q.set_transform(smooth=torch.rand(64) + 0.5, rotation=(left, right), perm=torch.randperm(64))
    x = torch.randn(7, 64)
    unfused = q(x)
    q.freeze()
    assert q._frozen_input_map is not None and "_frozen_input_map" not in q.state_dict()
    assert rel_err(q(x), unfused) <= 1e-5 and rel_err(q(x), linear(x)) <= 1e-5
    q.set_transform(perm=torch.randperm(64))
    assert q._frozen_input_map is None
    wide = QuantLinear.from_float(torch.nn.Linear(QuantLinear.FUSED_INPUT_MAP_MAX * 2, 8), OFF, OFF)
    wide.set_transform(rotation=random_hadamard(QuantLinear.FUSED_INPUT_MAP_MAX * 2, 0))
    wide.freeze()
    assert wide._frozen_input_map is None  # wide layers keep the Kronecker path (k^2 would not pay)


def test_a_frozen_weight_moves_with_the_module_and_stays_out_of_the_state_dict():
    """Lightning moves the model to the GPU after setup() froze it: the cached weight must follow."""
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), QuantSpec(bits=4), QuantSpec(bits=8, granularity="token"))
    q.freeze()
    q.double()  # the same Module._apply path as .to("cuda")
    assert q._frozen_weight.dtype == torch.float64 and q._frozen_weight.device == q.weight.device
    assert "_frozen_weight" not in q.state_dict()


def test_a_fresh_quant_linear_loads_every_part_a_calibrated_one_saved():
    torch.manual_seed(0)
    specs = QuantSpec(bits=4, granularity="group", group_size=16), QuantSpec(bits=4, granularity="group", group_size=16)
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), *specs)
    q.set_transform(smooth=torch.rand(64) + 0.5, rotation=random_hadamard(64, 1), perm=torch.randperm(64))
    q.set_lowrank(torch.randn(64, 4) * 0.1, torch.randn(4, 32) * 0.1)
    q.enable_weight_clipping(0.9)
    q.set_quantized_weight(q.quantized_weight().detach())
    fresh = QuantLinear.from_float(torch.nn.Linear(64, 32), *specs)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), q(x))
    assert set(dict(fresh.named_buffers())) == set(dict(q.named_buffers()))


def test_quant_linear_rejects_wrong_transform_shapes():
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), OFF, OFF, name="blk.0.fc1")
    with pytest.raises(ValueError, match="rotation of blk.0.fc1 must have shape"):
        q.set_transform(rotation=torch.eye(32))


def test_weight_clipping_is_learnable_and_starts_at_the_given_ratio():
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), QuantSpec(bits=3, granularity="group", group_size=32), OFF)
    logit = q.enable_weight_clipping(0.9)
    assert torch.allclose(torch.sigmoid(logit), torch.full((16, 1), 0.9))
    x = torch.randn(4, 64)
    q(x).pow(2).sum().backward()
    assert logit.grad is not None and logit.grad.abs().sum() > 0


def test_w8a8_quant_linear_is_close_and_w4a4_is_worse():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(128, 64), torch.randn(32, 128)
    ref = linear(x)
    errs = {}
    for wb, ab in ((8, 8), (4, 4)):
        q = QuantLinear.from_float(linear, QuantSpec(bits=wb), QuantSpec(bits=ab, granularity="token"))
        errs[wb] = sqnr_db(ref, q(x))
    assert errs[8] > 35 and errs[4] < errs[8] - 15


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec().bits = 4


def test_fp16_scales_are_fp16_values_and_change_the_weight_by_at_most_half_an_ulp():
    from tca_lightning.quant.quantizers import choose_qparams, fake_quant

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    spec32 = QuantSpec(bits=4, granularity="group", group_size=32)
    spec16 = QuantSpec(bits=4, granularity="group", group_size=32, scale_dtype="float16")
    s32, _ = choose_qparams(w, spec32)
    s16, _ = choose_qparams(w, spec16)
    assert torch.equal(s16, s16.half().float()) and not torch.equal(s16, s32)
    assert bool(((s16 - s32).abs() <= 2.0**-11 * s32).all())
    tiny, _ = choose_qparams(torch.full((1, 32), 1e-12), spec16)  # below FP16's range: floored, never 0
    assert float(tiny.min()) == 2.0**-24
    q16 = fake_quant(w, spec16)
    assert bool(((q16 - fake_quant(w, spec32)).abs() <= 0.5 * s32.max() + 2.0**-11 * w.abs() * 2).all())


def test_bad_scale_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        QuantSpec(bits=4, scale_dtype="bfloat16")


def test_changing_only_the_activation_quantizer_keeps_calibrated_weights():
    q = QuantLinear.from_float(torch.nn.Linear(64, 8), QuantSpec(bits=4, granularity="group", group_size=32),
                               QuantSpec(bits=4, granularity="group", group_size=32))
    calibrated = torch.randn(8, 64)  # e.g. GPTQ's weights, which rounding the FP weight would not reproduce
    q.weight_q = calibrated
    q.set_specs(act_spec=dataclasses.replace(q.act_spec, bits=8))
    assert torch.equal(q.quantized_weight(), calibrated)
    q.set_specs(weight_spec=dataclasses.replace(q.weight_spec, bits=8))  # another weight grid: re-quantize
    assert q.weight_q is None and not torch.equal(q.quantized_weight(), calibrated)

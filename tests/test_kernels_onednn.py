"""The oneDNN integer GEMM (per-channel weights x per-token activations) and PackedLinear's dispatch to it.

Exactness is checked against int64 matmuls of the same codes with unit scales, at the widths where
AVX2's int16 pair sums would saturate (u8 255 x |w| 128) as well as at small ones.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from tca_lightning.kernels import onednn
from tca_lightning.kernels.grouped import group_code_sums, int8_group_gemm, quantize_act_codes, zero_point_correction
from tca_lightning.kernels.packed_linear import PackedLinear
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec

pytestmark = pytest.mark.skipif(not onednn.onednn_available(), reason="torch build without oneDNN")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, lo, hi, dtype, seed):
    return torch.randint(lo, hi, shape, generator=_gen(seed)).to(dtype)


@pytest.mark.parametrize("act_bits,wmin,wmax", [(8, -128, 127), (8, -64, 64), (7, -128, 127), (4, -8, 7)])
@pytest.mark.parametrize("m,k,n", [(1, 33, 7), (5, 64, 16), (37, 1152, 70)])
def test_int32_sums_are_exact(act_bits, wmin, wmax, m, k, n):
    w = _codes((n, k), wmin, wmax + 1, torch.int8, m + k)
    u = _codes((m, k), 0, 2**act_bits, torch.uint8, n)
    weight = onednn.prepack_weight(w, torch.ones(n), act_bits)
    assert weight.split == ((2**act_bits - 1) * 2 * int(w.abs().max()) > onednn.INT16_MAX)
    for zp in (0, 2 ** (act_bits - 1)):
        ref = (u.long() - zp) @ w.long().t()
        assert ref.abs().max() < 2**24  # so FP32 holds every sum exactly
        assert torch.equal(onednn.int_gemm_onednn(u, zp, weight), ref.float())


def test_worst_case_codes_saturate_one_pass_but_not_the_split():
    u = torch.full((3, 64), 255, dtype=torch.uint8)
    w = torch.full((5, 64), 127, dtype=torch.int8)
    ref = (u.long() @ w.long().t()).float()
    weight = onednn.prepack_weight(w, torch.ones(5), 8)
    assert weight.split and torch.equal(onednn.int_gemm_onednn(u, 0, weight), ref)  # one pass: 2x too small on AVX2


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False), (6, False)])
def test_linear_matches_the_group_kernel_with_one_group(bits, symmetric):
    m, k, n = 9, 96, 24
    x = torch.randn(m, k, generator=_gen(1)) * 3 + 0.7  # skewed: asymmetric zero points are far from 0
    w = _codes((n, k), -(2 ** 7), 2**7, torch.int8, 2)
    ws, bias = torch.rand(n, generator=_gen(3)) * 0.01 + 1e-3, torch.randn(n, generator=_gen(4))
    y = onednn.onednn_linear(x, onednn.prepack_weight(w, ws, bits), symmetric, bias)
    codes, scale, zero = quantize_act_codes(x, bits, symmetric, k)
    ref = int8_group_gemm(codes, scale, w, ws[:, None], k, bias)
    if zero is not None:
        assert bool((zero != 0).any())
        ref = ref - zero_point_correction(scale, zero, ws[:, None], group_code_sums(w, k))
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-6  # same integers, FP32 epilogue order only


def test_u8_codes_are_the_shifted_fake_quant_codes():
    x = torch.randn(4, 32, generator=_gen(5))
    for bits, symmetric in ((8, True), (8, False), (4, False)):
        u, scale, zero = onednn.quantize_act_u8(x, bits, symmetric)
        codes, scale_ref, zero_ref = quantize_act_codes(x, bits, symmetric, 32)
        assert u.dtype == torch.uint8 and torch.equal(u.long(), codes.long() + 2 ** (bits - 1))
        assert torch.equal(scale, scale_ref) and (zero is None) == symmetric


def test_bad_inputs_fail_clearly():
    w = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="2-D int8 CPU tensor"):
        onednn.prepack_weight(w.float(), torch.ones(4), 8)
    with pytest.raises(ValueError, match="one value per output channel.*kernels.grouped"):
        onednn.prepack_weight(w, torch.ones(4, 2), 8)
    with pytest.raises(ValueError, match="2..8"):
        onednn.prepack_weight(w, torch.ones(4), 9)
    with pytest.raises(ValueError, match="non-empty"):
        onednn.prepack_weight(torch.zeros(4, 0, dtype=torch.int8), torch.ones(4), 8)
    weight = onednn.prepack_weight(w, torch.ones(4), 4)
    with pytest.raises(ValueError, match="uint8"):
        onednn.int_gemm_onednn(torch.zeros(2, 8, dtype=torch.int8), 0, weight)
    with pytest.raises(ValueError, match="K = 9"):
        onednn.int_gemm_onednn(torch.zeros(2, 9, dtype=torch.uint8), 0, weight)
    with pytest.raises(ValueError, match="exceed 4 bits"):
        onednn.int_gemm_onednn(torch.full((2, 8), 16, dtype=torch.uint8), 0, weight)
    with pytest.raises(ValueError, match="zero point"):
        onednn.int_gemm_onednn(torch.zeros(2, 8, dtype=torch.uint8), 256, weight)
    with pytest.raises(ValueError, match="2-D float"):
        onednn.quantize_act_u8(torch.zeros(2, 3, 8), 8, True)
    assert onednn.int_gemm_onednn(torch.zeros(0, 8, dtype=torch.uint8), 0, weight).shape == (0, 4)


def _per_channel_layer(wbits: int, abits: int, symmetric: bool, k: int = 48) -> QuantLinear:
    g = _gen(6)
    lin = torch.nn.Linear(k, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(20, generator=g))
    q = QuantLinear.from_float(lin, QuantSpec(wbits, True, "channel", 64), QuantSpec(abits, symmetric, "token", 64),
                               name="layer")
    q.freeze()
    return q


@pytest.mark.parametrize("wbits,abits,symmetric,k", [(8, 8, False, 48), (8, 8, True, 48), (4, 4, False, 48),
                                                     (4, 8, False, 47)])
def test_packed_linear_dispatches_per_channel_layers_to_onednn(wbits, abits, symmetric, k, monkeypatch):
    q = _per_channel_layer(wbits, abits, symmetric, k)
    p = PackedLinear.from_quant_linear(q)
    assert p.pack_group_size == k and p._onednn_applies(torch.device("cpu"))
    calls = []
    real = onednn.onednn_linear
    monkeypatch.setattr(onednn, "onednn_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 5, k, generator=_gen(7))
    with torch.no_grad():
        y, y_fake = p(x), q(x)
    assert calls and y.shape == (2, 5, 20)
    assert float((y - y_fake).abs().max() / y_fake.abs().max()) <= 1e-3  # FP16 weight scales, as for group layers
    # the group path on the same codes agrees to FP32 epilogue order
    codes, scale, zero = quantize_act_codes(x.reshape(-1, k), abits, symmetric, k)
    ws = p.weight_scale.float()
    ref = int8_group_gemm(codes, scale, p.weight_codes(), ws, k, p.bias)
    if zero is not None:
        ref = ref - zero_point_correction(scale, zero, ws, group_code_sums(p.weight_codes(), k))
    assert float((y.reshape(-1, 20) - ref).abs().max() / ref.abs().max()) < 1e-6
    clone = copy.deepcopy(p)  # the cached oneDNN weight (opaque) is dropped, not copied
    pickle.loads(pickle.dumps(p))
    with torch.no_grad():
        assert torch.equal(clone(x), y)


def test_group_layers_keep_the_group_kernels():
    q = QuantLinear.from_float(torch.nn.Linear(64, 8), QuantSpec(8, True, "group", 32), QuantSpec(8, False, "group", 32))
    q.freeze()
    assert not PackedLinear.from_quant_linear(q)._onednn_applies(torch.device("cpu"))


# --- the benchmark scripts' helpers (benchmarks/memory.py, benchmarks/cpu_latency.py) -----------------

@pytest.fixture
def bench(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    import importlib

    return importlib.import_module("memory"), importlib.import_module("cpu_latency")


def test_memory_counts_the_packed_tiny_dit(bench):
    memory, _ = bench
    from tca_lightning.models.loading import load_model

    assert memory.stored_bytes(torch.zeros(3, dtype=torch.float32)) == 6  # floats at FP16
    assert memory.stored_bytes(torch.zeros(3, dtype=torch.uint8)) == 3
    transformer = load_model("random:tiny-dit").transformer
    fp16 = sum(memory.state_bytes(transformer).values())
    packed = memory.pack_transformer(transformer, memory.repo_recipe())
    assert packed and all(isinstance(p, PackedLinear) for p in packed.values())
    assert all(isinstance(transformer.get_submodule(name), PackedLinear) for name in packed)
    assert sum(memory.state_bytes(transformer).values()) < fp16 / 2
    assert memory.owner_kind(transformer, next(iter(packed)) + ".qweight") == "PackedLinear.qweight"


def test_latency_helpers(bench):
    _, latency = bench
    assert latency.ratios({"fp32_ms": 10.0, "bf16_ms": 40.0, "w4a4_g32_ms": 20.0})["w4a4_g32_vs_bf16"] == 2.0
    assert latency.ratios({"fp32_ms": 10.0})["w8a8_onednn_vs_fp32"] is None
    w = torch.randn(6, 40, generator=_gen(8))
    codes, scale = latency.per_channel_codes(w, 8)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and scale.shape == (6,)
    assert latency.onednn_exact(codes, torch.randn(70, 40, generator=_gen(9)), 8)
    calls = []
    medians = latency.interleaved_medians({"a": lambda: calls.append("a"), "slow": lambda: calls.append("s")}, 3,
                                          only_first={"slow": 1})
    assert set(medians) == {"a", "slow"} and calls[:4] == ["a", "s", "a", "s"]  # warm-up, then rounds in turn
    assert calls.count("s") == 2 and calls.count("a") == 1 + 15  # fast rounds fill up to 15

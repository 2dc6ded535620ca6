"""INT4 packing and the W4A4 group GEMM: reference, CPU integer path, Triton kernels (interpreter).

The reference (tca_lightning.kernels.reference) is checked against first principles (int64 matmuls,
FP64 dequantize-then-matmul, fake_quant); the CPU and Triton paths are checked against the reference:
bit-exact on everything integer (codes, bytes, per-group dots) and on the activation scales.
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch

from tca_lightning.kernels import (
    group_int_partials,
    group_partials_cpu,
    pack_weight_codes,
    quantize_act_int4,
    quantize_weight_int4,
    w4a4_gemm_cpu,
    w4a4_gemm_reference,
    w4a4_linear,
)
from tca_lightning.quant.packing import pack_int4, unpack_int4
from tca_lightning.quant.quantizers import QuantSpec, fake_quant

# (M, K, N, G): M odd / below one tile, N not a multiple of any block, K = 3 G (not a power of two).
SHAPES = [(1, 96, 40, 32), (17, 96, 40, 32), (33, 128, 40, 64), (17, 192, 24, 64)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operands(m, k, n, g, seed=0, bias=True):
    """Random activations with per-channel magnitude spread, quantized activations and weights."""
    gen = _gen(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    w = torch.randn(n, k, generator=gen) * 0.2
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b, (*quantize_act_int4(x, g), *quantize_weight_int4(w, g))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _tie_activations(g: int) -> torch.Tensor:
    """Rows whose values divided by their scale land exactly on .5 (ties), plus an all-zero row."""
    ties = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -6.5, 4.5, -4.5, 5.5, -5.5, 0.0])
    row = ties.repeat(g // len(ties))
    return torch.stack([row, row * 0.5, -row, torch.zeros(g), row.flip(0) * 2.0 ** -20])


# ---- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [2, 4, 32, 64])
def test_pack_unpack_round_trips_every_pair_of_codes(group_size):
    codes = torch.arange(-8, 8)
    pairs = torch.tensor(list(itertools.product(codes.tolist(), repeat=2)))  # (256, 2): (low, high)
    half = group_size // 2
    q = torch.cat([pairs[:, :1].expand(-1, half), pairs[:, 1:].expand(-1, half)], dim=1)
    packed = pack_int4(q, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (256, half)
    assert len(set(packed[:, 0].tolist())) == 256  # all 256 byte values: the code is a bijection
    assert torch.equal(unpack_int4(packed, group_size), q.to(torch.int8))


def test_pack_layout_is_split_half_two_complement():
    q = torch.tensor([[1, -2, 3, -8, 7, 0, -1, 5]])  # two groups of 4
    packed = pack_int4(q, 4)
    # group 0: byte 0 = (1, 3), byte 1 = (-2, -8); group 1: byte 2 = (7, -1), byte 3 = (0, 5)
    assert packed.tolist() == [[0x31, 0x8E, 0xF7, 0x50]]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_pack_unpack_round_trips_random_shapes(dtype):
    gen = _gen(1)
    for shape, g in [((3, 5, 128), 32), ((7, 96), 32), ((2, 64), 64), ((1, 256), 128)]:
        q = torch.randint(-8, 8, shape, generator=gen).to(dtype)
        packed = pack_int4(q, g)
        assert packed.shape == (*shape[:-1], shape[-1] // 2)
        assert torch.equal(unpack_int4(packed, g), q.to(torch.int8))


def test_pack_accepts_unsigned_codes():
    q = torch.randint(0, 8, (4, 64), generator=_gen(2), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q, 32), 32), q.to(torch.int8))


def test_packing_rejects_bad_inputs_with_a_fix():
    ok = torch.zeros(2, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got values in \[-9, -9\]"):
        pack_int4(torch.full((1, 32), -9), 32)
    with pytest.raises(ValueError, match=r"\[0, 8\].*clamp"):
        pack_int4(torch.tensor([[8] + [0] * 31]), 32)
    with pytest.raises(ValueError, match="does not divide.*pad the input channels"):
        pack_int4(torch.zeros(2, 48, dtype=torch.int8), 32)
    with pytest.raises(ValueError, match="even"):
        pack_int4(ok, 3)
    with pytest.raises(ValueError, match="even"):
        pack_int4(ok, 0)
    with pytest.raises(ValueError, match="integer codes, got dtype torch.float32.*round and cast"):
        pack_int4(ok.float(), 32)
    with pytest.raises(ValueError, match="integer codes"):
        pack_int4(ok.bool(), 32)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(ok, 32)
    with pytest.raises(ValueError, match="does not divide"):
        unpack_int4(torch.zeros(2, 24, dtype=torch.uint8), 32)


# ---- reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n,g", SHAPES)
def test_reference_partials_are_exact_integer_dots(m, k, n, g):
    *_, (a_packed, _, w_packed, _) = _operands(m, k, n, g)
    a = unpack_int4(a_packed, g).long()
    w = unpack_int4(w_packed, g).long()
    partials = group_int_partials(a_packed, w_packed, g)
    assert partials.dtype == torch.int32 and partials.shape == (k // g, m, n)
    for i in range(k // g):
        cols = slice(i * g, (i + 1) * g)
        assert torch.equal(partials[i].long(), a[:, cols] @ w[:, cols].T)


@pytest.mark.parametrize("m,k,n,g", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_equals_dequantize_then_matmul(m, k, n, g, bias):
    _, _, b, (a_packed, a_scale, w_packed, w_scale) = _operands(m, k, n, g, bias=bias)
    a = unpack_int4(a_packed, g).double().reshape(m, -1, g) * a_scale.double()[..., None]
    w = unpack_int4(w_packed, g).double().reshape(n, -1, g) * w_scale.double()[..., None]
    expected = a.reshape(m, k) @ w.reshape(n, k).T + (b.double() if bias else 0)
    out = w4a4_gemm_reference(a_packed, a_scale, w_packed, w_scale, g, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert _rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("g", [32, 64])
def test_act_quant_dequantizes_to_fake_quant_exactly(g):
    x = torch.cat([torch.randn(9, 3 * g, generator=_gen(3)) * 4, torch.cat([_tie_activations(g)] * 3, dim=1)])
    packed, scale = quantize_act_int4(x, g)
    assert packed.dtype == torch.uint8 and scale.dtype == torch.float32 and scale.shape == (x.shape[0], 3)
    deq = (unpack_int4(packed, g).float().reshape(x.shape[0], 3, g) * scale[..., None]).reshape(x.shape)
    assert torch.equal(deq, fake_quant(x, QuantSpec(bits=4, granularity="group", group_size=g)))
    # ties round half to even, like torch.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2
    assert unpack_int4(packed, g)[9, :7].tolist() == [7, 0, 2, 2, 0, -2, -2]


def test_weight_quant_uses_its_stored_fp16_scale():
    g = 32
    w = torch.randn(24, 96, generator=_gen(4))
    w[3, :g] = 0.0  # an all-zero group keeps a positive scale and zero codes
    packed, scale = quantize_weight_int4(w, g)
    assert scale.dtype == torch.float16 and scale.shape == (24, 3) and bool((scale > 0).all())
    codes = unpack_int4(packed, g).float().reshape(24, 3, g)
    deq = codes * scale.float()[..., None]
    # nearest grid point of the *stored* scale (ties aside), clipping only beyond the grid's ends
    assert bool(((w.reshape(24, 3, g) - deq).abs() <= scale.float()[..., None] * 0.5 + 1e-7).all())
    assert bool((codes[3, 0] == 0).all())
    # precomputed codes (e.g. GPTQ's) pack to the same bytes
    packed2, scale2 = pack_weight_codes(unpack_int4(packed, g), scale.float()[..., None], g)
    assert torch.equal(packed2, packed) and torch.equal(scale2, scale)


def test_quantizers_reject_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize_act_int4(torch.randn(2, 3, 64), 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_act_int4(torch.tensor([[float("nan")] * 32]), 32)
    with pytest.raises(ValueError, match="FP16's range"):
        quantize_weight_int4(torch.full((1, 32), 1e6), 32)
    with pytest.raises(ValueError, match=r"shape \(N, K/G\)"):
        pack_weight_codes(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), 32)
    a_packed, a_scale = quantize_act_int4(torch.randn(3, 64), 32)
    w_packed, w_scale = quantize_weight_int4(torch.randn(5, 96), 32)
    with pytest.raises(ValueError, match="disagree on K: 64 vs 96"):
        w4a4_gemm_reference(a_packed, a_scale, w_packed, w_scale, 32)


# ---- CPU integer path ------------------------------------------------------------------------------


@pytest.mark.parametrize("arrangement", ["int16_bmm", "int_mm", "auto"])
@pytest.mark.parametrize("m,k,n,g", SHAPES)
def test_cpu_path_matches_reference(arrangement, m, k, n, g):
    _, _, b, (a_packed, a_scale, w_packed, w_scale) = _operands(m, k, n, g)
    partials = group_partials_cpu(a_packed, w_packed, g, arrangement)
    assert torch.equal(partials.int(), group_int_partials(a_packed, w_packed, g))
    for bias in (b, None):
        ref = w4a4_gemm_reference(a_packed, a_scale, w_packed, w_scale, g, bias)
        out = w4a4_gemm_cpu(a_packed, a_scale, w_packed, w_scale, g, bias, arrangement=arrangement)
        assert _rel_err(out, ref) < 1e-6


def test_int16_arrangement_is_exact_at_the_extremes():
    g = 256  # all -8 x -8: each group's dot is 64 * 256 = 16384
    a_packed = pack_int4(torch.full((2, 512), -8), g)
    w_packed = pack_int4(torch.full((3, 512), -8), g)
    partials = group_partials_cpu(a_packed, w_packed, g, "int16_bmm")
    assert bool((partials == 64 * g).all())
    with pytest.raises(ValueError, match="exact only for group_size <= 510"):
        zeros = pack_int4(torch.zeros(1, 512, dtype=torch.int8), 512)
        group_partials_cpu(zeros, zeros, 512, "int16_bmm")


def test_w4a4_linear_on_cpu_flattens_leading_dims():
    g, k, n = 32, 96, 40
    x = torch.randn(2, 3, k, generator=_gen(5))
    w_packed, w_scale = quantize_weight_int4(torch.randn(n, k, generator=_gen(6)), g)
    bias = torch.randn(n, generator=_gen(7))
    y = w4a4_linear(x, w_packed, w_scale, bias)  # group size inferred from the scales
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    ref = w4a4_gemm_reference(*quantize_act_int4(x.reshape(6, k), g), w_packed, w_scale, g, bias)
    assert torch.equal(y.reshape(6, n), ref)
    assert w4a4_linear(x.half(), w_packed, w_scale, bias).dtype == torch.float16


# ---- Triton kernels, under the interpreter ---------------------------------------------------------


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def tw():
    """The Triton kernel module, its kernels built for the interpreter.

    Triton 3.9 decides at ``@triton.jit`` time (when the module is imported), reading
    TRITON_INTERPRET through ``triton.knobs``; so set it first and reload the module if it was
    imported without it. The variable stays set while these tests launch kernels (the interpreter
    also consults it at call time); afterwards it is restored and the module rebuilt to match, so a
    later CUDA user in the same session gets compiled kernels, not interpreted ones.
    """
    pytest.importorskip("triton", reason="triton is not installed (pip install 'tca_lightning[dev]')")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module("tca_lightning.kernels.triton_w4a4")
    if not _is_interpreted(module._w4a4_gemm_kernel):
        module = importlib.reload(module)
    assert _is_interpreted(module._w4a4_gemm_kernel) and _is_interpreted(module._act_quant_pack_kernel)
    yield module
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(module)


@pytest.mark.parametrize("m,g", [(1, 32), (17, 32), (33, 64)])
def test_triton_act_quant_is_bit_exact(tw, m, g):
    k = 3 * g
    x = torch.randn(m, k, generator=_gen(m)) * torch.logspace(-2, 2, k)
    if m > 5:
        x[:5] = torch.cat([_tie_activations(g)] * 3, dim=1)
    packed, scale = tw.quantize_act_int4_triton(x, g, block_m=16)
    ref_packed, ref_scale = quantize_act_int4(x, g)
    assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)
    # half-precision input: upcast inside the kernel, like the reference
    packed16, scale16 = tw.quantize_act_int4_triton(x.half(), g, block_m=16)
    ref16 = quantize_act_int4(x.half(), g)
    assert torch.equal(packed16, ref16[0]) and torch.equal(scale16, ref16[1])


@pytest.mark.parametrize("m,k,n,g", SHAPES)
def test_triton_gemm_integer_dots_are_bit_exact(tw, m, k, n, g):
    """One-hot group scales make the output one group's int32 dot, exactly (|P| << 2^24)."""
    *_, (a_packed, _, w_packed, _) = _operands(m, k, n, g)
    partials = group_int_partials(a_packed, w_packed, g)
    for i in range(k // g):
        a_scale = torch.zeros(m, k // g)
        a_scale[:, i] = 1.0
        w_scale = torch.ones(n, k // g, dtype=torch.float16)
        out = tw.w4a4_gemm_triton(a_packed, a_scale, w_packed, w_scale, g, block_m=16, block_n=16)
        assert torch.equal(out, partials[i].float())


@pytest.mark.parametrize("m,k,n,g", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_gemm_matches_reference(tw, m, k, n, g, out_dtype):
    _, _, b, (a_packed, a_scale, w_packed, w_scale) = _operands(m, k, n, g)
    for bias, blocks in ((b, {"block_m": 16, "block_n": 16}), (None, {})):  # small tiles, and the GPU default 64
        ref = w4a4_gemm_reference(a_packed, a_scale, w_packed, w_scale, g, bias, out_dtype)
        out = tw.w4a4_gemm_triton(a_packed, a_scale, w_packed, w_scale, g, bias, out_dtype, **blocks)
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert _rel_err(out, ref) < (1e-6 if out_dtype == torch.float32 else 1e-3)


def test_triton_linear_is_quantize_then_gemm(tw):
    m, k, n, g = 17, 128, 40, 64
    x, _, b, (_, _, w_packed, w_scale) = _operands(m, k, n, g)
    ref = w4a4_gemm_reference(*quantize_act_int4(x, g), w_packed, w_scale, g, b)
    out = tw.w4a4_linear_triton(x, w_packed, w_scale, b, g, block_m=16, block_n=16)
    assert _rel_err(out, ref) < 1e-6
    out16 = tw.w4a4_linear_triton(x.half(), w_packed, w_scale, b, g)
    ref16 = w4a4_gemm_reference(*quantize_act_int4(x.half(), g), w_packed, w_scale, g, b, torch.float16)
    assert out16.dtype == torch.float16 and _rel_err(out16, ref16) < 1e-3


def test_triton_rejects_group_sizes_its_dot_cannot_take(tw):
    with pytest.raises(ValueError, match="power-of-two group sizes >= 32"):
        tw.quantize_act_int4_triton(torch.randn(2, 48), 16)
    with pytest.raises(ValueError, match="power-of-two"):
        tw.quantize_act_int4_triton(torch.randn(2, 96), 48)

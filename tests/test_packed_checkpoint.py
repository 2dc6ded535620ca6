"""Packed quantized checkpoints: PackedLinear vs the fake quant it replaces, the integer W8A8 path,
save_quantized / load_quantized round trips, atomic writes, and clear errors on broken checkpoints.

Tolerances, and why. A packed checkpoint stores weight scales in FP16. The recipe's default
(``weight_scale_dtype="float16"``) makes the fake quant use those very FP16 values, so a PackedLinear has
the same weight, the same activation codes and exact integer dots: only FP32 summation order differs,
one layer agrees to ~3e-7 of its output range (asserted <= 1e-5) and a whole W4A4 model to ~1e-7 relative
L2 (asserted < 1e-5). With FP32 scales in the fake quant (``weight_scale_dtype="float32"``) packing rounds
each group's weight by (1 + d), |d| <= 2^-11 (4.9e-4): one layer then agrees to 3.0e-4 .. 3.5e-4 of its
range (asserted <= 1e-3), and a whole W4A4 model compounds it, since a scale 2^-11 off moves some
activations across a 4-bit rounding boundary in the next layer (a flip is 1/7 of a group's range):
measured 0.54% (DiT, GPTQ) relative L2 on the 2-layer random models, asserted in (1e-5, 2e-2). Over a
sampling trajectory such flips compound further (benchmarks/packed_e2e.py), which is why FP16 is the default."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import pytest
import torch

from tca_lightning.export import (CONFIG_FILE, FORMAT_VERSION, TENSORS_FILE, load_quantized, pack_quantized_linears,
                                  read_quantized_config, save_quantized)
from tca_lightning.kernels.grouped import (group_code_sums, group_partials_int8, int8_group_gemm, quantize_act_codes,
                                           zero_point_correction)
from tca_lightning.kernels.packed_linear import PackedLinear
from tca_lightning.methods import GPTQ, RTN, QuantRecipe, SmoothQuant
from tca_lightning.models.adapters import get_adapter
from tca_lightning.models.samplers import SamplerConfig
from tca_lightning.ptq import CalibrationConfig, quantize_model
from tca_lightning.quant.grid import grid_codes
from tca_lightning.quant.linear import QuantLinear
from tca_lightning.quant.quantizers import QuantSpec, fake_quant

FP16_SCALE_REL = 2.0**-11  # FP16 has an 11-bit significand: round to nearest is within half an ulp, 2^-11
RECIPE = QuantRecipe(wbits=4, abits=4, weight_granularity="group", act_granularity="group", group_size=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- codes from an on-grid weight --------------------------------------------------------------------

def test_grid_codes_reproduce_rtn_and_gptq_like_grids():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    rtn = fake_quant(w, QuantSpec(bits=4, granularity="group", group_size=32))
    codes, scale = grid_codes(rtn, 4, 32)
    assert codes.dtype == torch.int8 and scale.shape == (16, 2)
    back = codes.float() * scale.repeat_interleave(32, 1)
    assert _rel(back, rtn) <= 1e-6
    # GPTQ-like: largest code below qmax in some groups, -8 (the grid's extra negative code) in others
    q = torch.randint(-5, 6, (16, 64), generator=g)
    q[0, 3], q[1, 40] = -8, 7
    s = torch.rand(16, 2, generator=g) + 0.01
    on_grid = q.float() * s.repeat_interleave(32, 1)
    codes, scale = grid_codes(on_grid, 4, 32)
    assert _rel(codes.float() * scale.repeat_interleave(32, 1), on_grid) <= 1e-6
    with pytest.raises(ValueError, match="not on a symmetric 4-bit grid"):
        grid_codes(w, 4, 32)


# --- one layer ---------------------------------------------------------------------------------------

LAYERS = {  # (wbits, abits, act symmetric, weight granularity, weight group, act granularity, act group)
    "w4a4-sym": (4, 4, True, "group", 32, "group", 32),
    "w4a4-asym": (4, 4, False, "group", 32, "group", 32),
    "w8a8-asym": (8, 8, False, "group", 32, "group", 32),
    "w4a8": (4, 8, False, "group", 32, "group", 32),
    "w4-channel-a4-group": (4, 4, False, "channel", 64, "group", 32),
    "w4-group64-a4-group32": (4, 4, True, "group", 64, "group", 32),
    "w4-group-a4-token": (4, 4, False, "group", 32, "token", 64),
    "w4a16-weight-only": (4, 16, False, "group", 32, "group", 32),
    "w16a4-fp-weight": (16, 4, False, "group", 32, "group", 32),
}


def _quant_linear(wbits, abits, sym, wgran, wg, agran, ag, seed=0, scale_dtype="float16") -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(48, generator=g))
    q = QuantLinear.from_float(lin, QuantSpec(wbits, True, wgran, wg, scale_dtype=scale_dtype),
                               QuantSpec(abits, sym, agran, ag), name="layer")
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    q.set_transform(smooth=torch.rand(64, generator=g) + 0.5, rotation=rotation, perm=torch.randperm(64, generator=g))
    q.freeze()
    return q


@pytest.mark.parametrize("layer", list(LAYERS))
def test_packed_linear_matches_its_quant_linear(layer):
    q = _quant_linear(*LAYERS[layer])  # FP16 weight scales, as the recipe makes them
    p = PackedLinear.from_quant_linear(q)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        y_fake, y_packed = q(x), p(x)
    assert y_packed.shape == y_fake.shape and y_packed.dtype == x.dtype
    if p.weight_format != "float":
        assert torch.equal(p.dequantized_weight(), q.quantized_weight())  # packing loses nothing
    assert _rel(y_packed, y_fake) <= 1e-5  # integer dots vs float: summation order only


def test_a_packed_permutation_is_stored_as_int16_and_a_broken_one_is_rejected():
    q = _quant_linear(*LAYERS["w4a4-asym"])
    p = PackedLinear.from_quant_linear(q)
    assert p.perm.dtype == torch.int16 and torch.equal(p.perm.long(), q.perm)  # 2 bytes a channel, not 8
    rebuilt = PackedLinear.from_config(p.config(), {**p.tensors(), "perm": q.perm})  # a format-1 int64 perm
    assert torch.equal(rebuilt.perm, p.perm)
    broken = q.perm.clone()
    broken[0] = broken[1]
    with pytest.raises(ValueError, match="perm is not a permutation of range"):
        PackedLinear.from_config(p.config(), {**p.tensors(), "perm": broken})


@pytest.mark.parametrize("layer", ["w4a4-asym", "w8a8-asym", "w4-group-a4-token"])
def test_fp32_scales_are_rounded_to_fp16_by_packing(layer):
    q = _quant_linear(*LAYERS[layer], scale_dtype="float32")
    p = PackedLinear.from_quant_linear(q)
    w = q.quantized_weight()
    assert not torch.equal(p.dequantized_weight(), w)
    assert bool(((p.dequantized_weight() - w).abs() <= FP16_SCALE_REL * w.abs() + 1e-12).all())
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        same = copy.deepcopy(q)
        same.set_quantized_weight(p.dequantized_weight())  # the fake quant with the packed weight, exactly
        assert _rel(p(x), same(x)) <= 1e-5
        assert _rel(p(x), q(x)) <= 1e-3  # measured 3.0e-4 .. 3.5e-4 (FP16 rounding of the scales)


@pytest.mark.parametrize("fp16_factors", [True, False])
def test_low_rank_branch_is_packed_beside_the_integer_weight(fp16_factors):
    """SVDQuant's FP branch travels with the INT4 codes: the packed layer equals the fake quant (FP16 scale rounding
    aside), through config()/tensors() too; FP16-valued factors are stored in FP16, others as they are."""
    from tca_lightning.methods.svdquant import apply_svdquant
    from tca_lightning.quant.transforms import fp16_values

    q = _quant_linear(*LAYERS["w4a4-sym"])
    apply_svdquant(q, 4)
    if fp16_factors:
        q.set_lowrank(fp16_values(q.lowrank_a), fp16_values(q.lowrank_b))
    p = PackedLinear.from_quant_linear(q)
    assert p.lowrank_a.dtype == (torch.float16 if fp16_factors else torch.float32)
    assert p.config()["lowrank_rank"] == 4 and "low rank 4" in repr(p)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        same = copy.deepcopy(q)
        same.set_quantized_weight(p.dequantized_weight())
        assert _rel(p(x), same(x)) <= 1e-5
        without = copy.deepcopy(p)
        without.lowrank_a = without.lowrank_b = None
        assert _rel(without(x), same(x)) > 1e-2  # the branch carries a real part of the product
        rebuilt = PackedLinear.from_config(p.config(), p.tensors())
        assert torch.equal(rebuilt(x), p(x))
    with pytest.raises(ValueError, match="tensors missing \\['lowrank_b'\\]"):
        PackedLinear.from_config(p.config(), {k: v for k, v in p.tensors().items() if k != "lowrank_b"})
    with pytest.raises(ValueError, match="lowrank_b has shape"):
        PackedLinear.from_config(p.config(), {**p.tensors(), "lowrank_b": torch.zeros(4, 7)})


def test_w8a8_integer_gemm_is_exact():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (7, 96), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (5, 96), generator=g, dtype=torch.int8)
    partials = group_partials_int8(a, w, 32)
    expected = torch.einsum("mgk,ngk->gmn", a.long().view(7, 3, 32), w.long().view(5, 3, 32))
    assert partials.dtype == torch.int32 and torch.equal(partials.long(), expected)
    a_s, w_s, bias = torch.rand(7, 3, generator=g), torch.rand(5, 3, generator=g).half(), torch.randn(5, generator=g)
    out = int8_group_gemm(a, a_s, w, w_s, 32, bias)
    deq = lambda c, s: c.double() * s.double().repeat_interleave(32, 1)  # noqa: E731
    reference = deq(a, a_s) @ deq(w, w_s).t() + bias.double()
    assert _rel(out.double(), reference) <= 1e-6  # FP32 epilogue vs FP64: rounding only


def test_asymmetric_activations_by_zero_point_correction():
    """(q' - z') s codes reproduce the asymmetric fake quant; the corrected GEMM equals its float product."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 64, generator=g) * 3 - 0.5  # skewed, as post-GELU inputs are
    codes, scale, zero = quantize_act_codes(x, 8, False, 32)
    deq = (codes.float() - zero.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.equal(deq, fake_quant(x, QuantSpec(8, False, "group", 32)))
    w = torch.randint(-128, 128, (4, 64), generator=g, dtype=torch.int8)
    w_s = torch.rand(4, 2, generator=g)
    y = int8_group_gemm(codes, scale, w, w_s, 32) - zero_point_correction(scale, zero, w_s, group_code_sums(w, 32))
    reference = deq.double() @ (w.double() * w_s.double().repeat_interleave(32, 1)).t()
    assert _rel(y.double(), reference) <= 1e-5


# --- whole models -----------------------------------------------------------------------------------

def _gptq_dit(tiny_dit, recipe=RECIPE):
    adapter = get_adapter(tiny_dit)
    method = GPTQ(recipe, base=SmoothQuant(recipe))  # transforms (smooth shared by q/k/v) and GPTQ's grid
    quantize_model(adapter, method, SamplerConfig(num_steps=3), CalibrationConfig(num_conditions=4, num_steps=3,
                                                                                  cache_dir=None), "random:tiny-dit")
    return adapter, "gptq"


def _rtn_pixart(tiny_pixart, caption_encoder):
    adapter = get_adapter(tiny_pixart, caption_encoder)
    RTN(RECIPE).quantize(adapter)
    return adapter, "rtn"


def _packed_in_memory(transformer):
    """The quantized model with its QuantLinears swapped for PackedLinears, without a file in between."""
    model = copy.deepcopy(transformer)
    for name, layer in pack_quantized_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def _kron_dit(tiny_dit):
    """RTN weights behind smoothing and Kronecker-factored rotations (the form TCA-DiT's ARC bakes)."""

    from tca_lightning.quant.transforms import fp16_values, kron_factors, random_hadamard

    adapter = get_adapter(tiny_dit)
    qlinears = RTN(RECIPE).quantize(adapter)
    for i, group in enumerate(adapter.shared_input_groups(list(qlinears))):  # q/k/v: one transform, as ARC
        k = qlinears[group[0]].in_features
        a, b = kron_factors(k)
        g = torch.Generator().manual_seed(i)
        smooth = fp16_values(torch.rand(k, generator=g) + 0.5)  # FP16 values, as ARC.bake leaves them
        rotation = (fp16_values(random_hadamard(a, seed=2 * i)), fp16_values(random_hadamard(b, seed=2 * i + 1)))
        for name in group:
            qlinears[name].set_transform(smooth=smooth.clone(), rotation=tuple(f.clone() for f in rotation))
            qlinears[name].freeze()
    return adapter, "kron"


@pytest.fixture(params=["dit-gptq", "pixart-rtn", "dit-kron"])
def quantized(request, tiny_dit, tiny_pixart, caption_encoder):
    if request.param == "dit-gptq":
        return _gptq_dit(tiny_dit)
    if request.param == "dit-kron":
        return _kron_dit(tiny_dit)
    return _rtn_pixart(tiny_pixart, caption_encoder)


def test_save_load_round_trip(quantized, make_inputs, tmp_path):
    adapter, method = quantized
    x, t, cond = make_inputs(adapter, 2)
    with torch.no_grad():
        y_fake = adapter.forward(x, t, cond)
        y_packed = get_adapter(_packed_in_memory(adapter.transformer), adapter.caption_encoder).forward(x, t, cond)
    path = save_quantized(adapter, tmp_path / "quantized", RECIPE, "random:tiny", method=method)
    assert sorted(os.listdir(tmp_path)) == ["quantized"] and sorted(os.listdir(path)) == [TENSORS_FILE, CONFIG_FILE]
    loaded = load_quantized(path)
    assert type(loaded) is type(adapter.transformer) and not any(isinstance(m, QuantLinear) for m in loaded.modules())
    with torch.no_grad():
        y_loaded = get_adapter(loaded, adapter.caption_encoder).forward(x, t, cond)
    assert torch.equal(y_loaded, y_packed)  # the file changes nothing
    rel = float((y_loaded - y_fake).norm() / y_fake.norm())
    if method == "kron":
        # random rotations on a random W4A4 model: summation-order ulps flip a few 4-bit activation codes and
        # the blocks amplify them (dense rotations measured 2e-3, Kronecker 1e-2; layer by layer both <= 3e-7)
        for name, layer in pack_quantized_linears(copy.deepcopy(adapter.transformer)).items():
            q = adapter.transformer.get_submodule(name)
            xl = torch.randn(16, q.in_features, generator=torch.Generator().manual_seed(0)) * 3
            with torch.no_grad():
                assert float((layer(xl) - q(xl)).norm() / q(xl).norm()) <= 1e-5, name
        assert rel < 5e-2, rel
    else:
        assert rel < 1e-5, rel  # the fake quant used the FP16 scales: summation order only (module docstring)

    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION == 4 and config["method"] == method and config["model"] == "random:tiny"
    assert config["recipe"]["wbits"] == 4 and config["recipe"]["group_size"] == 32
    assert config["transformer"]["class_name"] == type(adapter.transformer).__name__
    assert config["transformer"]["config"]["num_layers"] == 2
    roles = {layer["role"]: layer for layer in config["layers"].values()}
    assert (roles["qkv"]["weight_bits"], roles["qkv"]["act_bits"], roles["qkv"]["weight_format"]) == (4, 4, "int4")
    assert (roles["final"]["weight_bits"], roles["final"]["weight_format"]) == (8, "int8")
    if adapter.kind == "pixart":
        assert config["caption_encoder"] == {"source": "random:tiny", "class": "TinyCaptionEncoder",
                                             "config": {"embed_dim": 64, "max_length": 8, "seed": 0}}
    else:
        assert config["caption_encoder"] is None
        assert "smooth" in roles["qkv"]["transforms"]
    if method == "kron":  # stored as factors, never densified: (a^2 + b^2) numbers, not k^2
        assert {"rotation_left", "rotation_right"} <= set(roles["qkv"]["transforms"])
        assert "rotation" not in roles["qkv"]["transforms"]
        layer = next(m for m in loaded.modules() if isinstance(m, PackedLinear) and m.role == "qkv")
        assert layer.rotation is None and tuple(layer.rotation_left.shape) == (8, 8)
        # FP16-valued transforms are stored in FP16, and q/k/v's shared one once
        assert layer.rotation_left.dtype == layer.smooth.dtype == torch.float16
        q_name = next(n for n, r in config["layers"].items() if r["role"] == "qkv" and n.endswith("to_q"))
        k_name = q_name[:-len("to_q")] + "to_k"
        assert config["aliases"][f"{k_name}.rotation_left"] == f"{q_name}.rotation_left"
        assert config["aliases"][f"{k_name}.smooth"] == f"{q_name}.smooth"
        assert f"{k_name}.qweight" not in config["aliases"]  # different weights stay apart
        assert config["safetensors"]["num_tensors"] + len(config["aliases"]) == len(loaded.state_dict()) - sum(
            1 for k in loaded.state_dict() if k.endswith("._perm_index"))
    w4 = config["memory"]["w4"]  # 4 + 16/32 bits a weight: 3.56x under FP16
    assert w4["fp16_bytes"] / w4["weight_bytes"] > 3
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear) and m.weight_bits == 4]
    fp16_bytes = sum(2 * m.in_features * m.out_features for m in packed)
    assert packed and fp16_bytes / sum(m.weight_nbytes() for m in packed) > 3


def test_with_fp32_scales_the_fake_quant_model_drifts_from_the_packed_one(tiny_dit, make_inputs):
    """Why weight_scale_dtype defaults to float16: FP32 scales make the evaluated model differ from the deployed one."""
    adapter, _ = _gptq_dit(tiny_dit, dataclasses.replace(RECIPE, weight_scale_dtype="float32"))
    packed = _packed_in_memory(adapter.transformer)
    x, t, cond = make_inputs(adapter, 2)
    with torch.no_grad():
        y_fake, y_packed = adapter.forward(x, t, cond), get_adapter(packed).forward(x, t, cond)
    assert 1e-5 < float((y_packed - y_fake).norm() / y_fake.norm()) < 2e-2  # measured 5.4e-3


# --- writing and reading safely ----------------------------------------------------------------------

@pytest.fixture
def saved(tiny_pixart, caption_encoder, tmp_path):
    adapter, _ = _rtn_pixart(tiny_pixart, caption_encoder)
    return save_quantized(adapter, tmp_path / "ckpt", RECIPE, "random:tiny-pixart", method="rtn"), adapter


def test_failed_export_leaves_nothing(tiny_pixart, caption_encoder, tmp_path, monkeypatch):
    import tca_lightning.export as export

    adapter, _ = _rtn_pixart(tiny_pixart, caption_encoder)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(adapter, tmp_path / "ckpt", RECIPE, "random:tiny-pixart")
    assert os.listdir(tmp_path) == []  # no target, no temp directory, no partial file


def test_failed_reexport_keeps_the_old_checkpoint(saved, monkeypatch):
    import tca_lightning.export as export

    path, adapter = saved
    before = (path / TENSORS_FILE).read_bytes()
    monkeypatch.setattr(export, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_quantized(adapter, path, RECIPE, "random:tiny-pixart")
    assert (path / TENSORS_FILE).read_bytes() == before and sorted(os.listdir(path.parent)) == ["ckpt"]
    load_quantized(path)


def test_missing_file(saved):
    path, _ = saved
    (path / TENSORS_FILE).unlink()
    with pytest.raises(ValueError, match=f"{TENSORS_FILE}: is missing.*re-export it with"):
        load_quantized(path)
    with pytest.raises(ValueError, match="no packed checkpoint directory"):
        load_quantized(path.parent / "nowhere")


def test_truncated_safetensors(saved):
    path, _ = saved
    data = (path / TENSORS_FILE).read_bytes()
    (path / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="SHA-256.*truncated or corrupted"):
        load_quantized(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    del config["safetensors"]["sha256"]  # without the checksum, safetensors' own header check catches it
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{TENSORS_FILE}: is truncated or corrupt"):
        load_quantized(path)


def test_unknown_format_version_and_bad_json(saved):
    path, _ = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 5}))
    with pytest.raises(ValueError, match="format_version 5, this tca_lightning reads format_version 1 or 2 or 3 or 4"):
        load_quantized(path)
    (path / CONFIG_FILE).write_text(json.dumps({**config, "aliases": {"blocks.0.x.smooth": "no.such.tensor"}}))
    with pytest.raises(ValueError, match="says 'blocks.0.x.smooth' is stored as 'no.such.tensor', which "
                                         "model.safetensors does not hold"):
        load_quantized(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: is not valid JSON"):
        read_quantized_config(path)


def _rewrite_tensors(path, edit):
    """Change the safetensors file and keep the JSON's checksum consistent, as a buggy exporter would."""
    from safetensors.torch import load_file, save_file

    from tca_lightning.export import _sha256

    tensors = load_file(str(path / TENSORS_FILE))
    edit(tensors)
    save_file(tensors, str(path / TENSORS_FILE))
    config = json.loads((path / CONFIG_FILE).read_text())
    config["safetensors"]["sha256"] = _sha256(path / TENSORS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_shape_mismatch_of_a_packed_layer(saved):
    path, _ = saved
    key = "transformer_blocks.0.attn1.to_q.qweight"
    _rewrite_tensors(path, lambda t: t.update({key: t[key][:, :-2].contiguous()}))
    with pytest.raises(ValueError, match="does not match quantized.json for layer transformer_blocks.0.attn1.to_q "
                                         ".*qweight \\(int4 weight\\) has shape \\(64, 30\\), expected \\(64, 32\\)"):
        load_quantized(path)


def test_missing_and_misshapen_fp_tensors(saved):
    path, _ = saved
    copy_dir = path.parent / "copy"
    shutil.copytree(path, copy_dir)
    _rewrite_tensors(path, lambda t: t.pop("pos_embed.proj.bias"))
    with pytest.raises(ValueError, match="missing tensors \\['pos_embed.proj.bias'\\]"):
        load_quantized(path)
    _rewrite_tensors(copy_dir, lambda t: t.update({"pos_embed.proj.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="wrong shapes \\['pos_embed.proj.bias \\(3,\\) vs \\(64,\\)'\\]"):
        load_quantized(copy_dir)


def test_evaluator_swaps_in_the_packed_model(tmp_path):
    """``test --model.init_args.quantized PATH``: the packed model is evaluated, the FP model is the reference."""
    from tca_lightning.evaluate import DiffusionEvaluator
    from tca_lightning.models.loading import load_model

    fp = load_model("random:tiny-dit")  # what the evaluator loads for model=random:tiny-dit (seed 0)
    adapter = get_adapter(fp.transformer)
    RTN(RECIPE).quantize(adapter)
    path = save_quantized(adapter, tmp_path / "quantized", RECIPE, "random:tiny-dit", method="rtn")
    evaluator = DiffusionEvaluator(model="random:tiny-dit", quantized=str(path))
    evaluator.setup("test")
    assert any(isinstance(m, PackedLinear) for m in evaluator.transformer.modules())
    assert not any(isinstance(m, (PackedLinear, QuantLinear)) for m in evaluator.reference_model.modules())
    assert evaluator.is_quantized and evaluator.compares_to_reference
    assert evaluator.record_overrides() == {"method": "rtn", "wbits": 4, "abits": 4, "kernels": "integer"}
    with pytest.raises(ValueError, match="exclude each other"):
        DiffusionEvaluator(model="random:tiny-dit", quantized=str(path), quantization=RTN(RECIPE))

"""PackedLinear: one quantized linear as stored in a packed checkpoint, run with integer kernels.

It holds what inference needs and nothing else: integer weight codes in the transformed basis
(split-half packed INT4 for <= 4 bits, int8 for 5..8), FP16 scales per (row, weight group), the
bias, and the fixed input transform buffers (smooth, rotation, perm) that QuantLinear applies with
the same :func:`tca_lightning.quant.transforms.transform_input`. Its forward:

    x' = transform_input(x, smooth, rotation, perm)
    per-channel weight and per-token activation (both groups span K) on CPU: one exact integer GEMM on
        oneDNN (tca_lightning.kernels.onednn; the scales factor out of it), the prepacked weight cached;
    W4A4, symmetric activations, one group size: tca_lightning.kernels.w4a4_linear (Triton on CUDA,
        integer CPU path otherwise; activations quantized per token per group inside);
    other integer mixes (W8A8, W4A8, asymmetric activations, weight and activation groups of different
        sizes): activation codes by quant.quantizers' formulas, exact per-group integer dots
        (kernels.grouped), the zero point as a correction term;
    weight-only (activations >= 16 bits): F.linear with the dequantized weight;
    plus, where the layer has one, SVDQuant's floating-point low-rank branch (x' A) B on the unquantized x'
        (Li et al., ICLR 2025): two thin GEMMs beside the integer one (``lowrank_a`` (K, r), ``lowrank_b`` (r, N),
        FP16 where that is lossless);
    FP weights (a QuantLinear whose weight_spec is >= 16 bits): F.linear, activations fake-quantized
        in float when their spec asks for it (no integer kernel to run there).

The integer GEMM's group is G = gcd(weight group, activation group) (a per-channel weight or a
per-token activation counts as one group of in_features): both sides' scales are constant on every
G-group, so the per-group dots are exact and the scales expand to it. INT4 weights are packed in the
split-half layout *of that G*; ``pack_group_size`` in the layer's config records it.

Versus the QuantLinear it came from, the only value change is the scales' rounding to FP16 (at most
2^-11 relative per group, tests/test_packed_checkpoint.py measures it), plus the float summation
order of the epilogue; activations get the very same integer codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tca_lightning.kernels import onednn
from tca_lightning.kernels.grouped import (expand_groups, group_code_sums, int8_group_gemm, quantize_act_codes,
                                           zero_point_correction)
from tca_lightning.kernels.reference import _to_fp16_scale
from tca_lightning.quant.grid import grid_codes
from tca_lightning.quant.packing import pack_int4, unpack_int4
from tca_lightning.quant.quantizers import QuantSpec, fake_quant
from tca_lightning.quant.transforms import (TRANSFORM_BUFFERS, Rotation, check_rotation, narrow_if_lossless,
                                            rotation_buffers, stored_rotation, transform_input)

CONFIG_KEYS = ("in_features", "out_features", "weight_bits", "act_bits", "weight_group_size", "act_group_size",
               "act_symmetric", "name", "role")


def gemm_group_size(in_features: int, weight_group: int, act_group: int, act_bits: int) -> int:
    """The integer GEMM's group: gcd of the weight's and the activation's (the weight's when A is FP)."""
    return math.gcd(weight_group, act_group) if act_bits < 16 else weight_group


def _spec_group(spec: QuantSpec, in_features: int, what: str, name: str) -> int:
    if not spec.enabled:
        return in_features
    if spec.granularity == "tensor":
        raise ValueError(f"{name}: per-tensor {what} quantization has no packed form (the integer kernels take "
                         f"per-group or per-{'channel' if what == 'weight' else 'token'} scales)")
    return spec.group_size if spec.granularity == "group" else in_features


class PackedLinear(nn.Module):
    """See the module docstring. Build with :meth:`from_quant_linear` or :meth:`from_config`."""

    def __init__(self, in_features: int, out_features: int, *, weight_bits: int, act_bits: int,
                 weight_group_size: int, act_group_size: int, act_symmetric: bool, qweight: torch.Tensor,
                 weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, rotation: Rotation | None = None,
                 perm: torch.Tensor | None = None, lowrank_a: torch.Tensor | None = None,
                 lowrank_b: torch.Tensor | None = None, name: str = "linear", role: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.name, self.role = in_features, out_features, name, role
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.weight_group_size, self.act_group_size = weight_group_size, act_group_size
        self.act_symmetric = act_symmetric
        k, n = in_features, out_features
        for what, g in (("weight", weight_group_size), ("activation", act_group_size)):
            if g < 1 or k % g:
                raise ValueError(f"{name}: {what} group size {g} does not divide in_features {k}")
        self.pack_group_size = gemm_group_size(k, weight_group_size, act_group_size, act_bits)
        if weight_bits >= 16:
            self.weight_format = "float"
        else:
            self.weight_format = "int4" if weight_bits <= 4 and self.pack_group_size % 2 == 0 else "int8"
        expected = {"float": ((n, k), None), "int8": ((n, k), torch.int8), "int4": ((n, k // 2), torch.uint8)}
        shape, dtype = expected[self.weight_format]
        self._check(f"qweight ({self.weight_format} weight)", qweight, shape, dtype)
        if self.weight_format != "float":
            self._check("weight_scale", weight_scale, (n, k // weight_group_size), torch.float16)
        if bias is not None:
            self._check("bias", bias, (n,), None)
        if smooth is not None:
            self._check("smooth", smooth, (k,), None)
        if perm is not None:  # stored narrow (int16 below 32768 channels: 2 bytes a channel, not 8), indexed as int64
            if perm.dtype not in (torch.int16, torch.int32, torch.int64):
                raise ValueError(f"{name}: perm has dtype {perm.dtype}, expected an integer dtype")
            self._check("perm", perm, (k,), perm.dtype)
            if perm.numel() and not torch.equal(torch.sort(perm.long()).values, torch.arange(k, device=perm.device)):
                raise ValueError(f"{name}: perm is not a permutation of range({k})")
            perm = perm.to(torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32)
        rotations = rotation_buffers(None if rotation is None else check_rotation(rotation, k, name))
        for r_name, value in rotations.items():
            if value is not None:
                self._check(r_name, value, tuple(value.shape), None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", None if self.weight_format == "float" else weight_scale)
        self.register_buffer("bias", bias)
        for b_name, value in (("smooth", smooth), *rotations.items()):  # FP16 where lossless (ARC.bake's values)
            self.register_buffer(b_name, narrow_if_lossless(value))
        self.register_buffer("perm", perm)
        if (lowrank_a is None) != (lowrank_b is None):
            raise ValueError(f"{name}: a low-rank branch needs both lowrank_a and lowrank_b")
        if lowrank_a is not None:
            self._check("lowrank_a", lowrank_a, (k, lowrank_a.shape[-1]), None)
            self._check("lowrank_b", lowrank_b, (lowrank_a.shape[-1], n), None)
        self.register_buffer("lowrank_a", narrow_if_lossless(lowrank_a))
        self.register_buffer("lowrank_b", narrow_if_lossless(lowrank_b))
        self.register_buffer("_perm_index", None if perm is None else perm.long(), persistent=False)
        # derived, rebuilt on load (not in checkpoints): scales on the GEMM's groups, weight code sums per group
        self.register_buffer("_gemm_scale", None, persistent=False)
        self.register_buffer("_code_sums", None, persistent=False)
        if self.weight_format != "float" and act_bits < 16:
            self._gemm_scale = expand_groups(weight_scale, weight_group_size // self.pack_group_size)
            if not act_symmetric:
                self._code_sums = group_code_sums(self.weight_codes(), self.pack_group_size)

    def _check(self, what: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype | None) -> None:
        if t is None:
            raise ValueError(f"{self.name}: {what} is missing")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.name}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{self.name}: {what} has dtype {t.dtype}, expected {dtype}")
        if dtype is None and not t.dtype.is_floating_point:
            raise ValueError(f"{self.name}: {what} has dtype {t.dtype}, expected a floating-point dtype")

    # --- construction ----------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q) -> "PackedLinear":
        """Pack a finalized QuantLinear (its ``quantized_weight()``: GPTQ's installed grid, or RTN's)."""
        name = q.name
        if q.transform is not None:
            raise ValueError(f"{name} still has a learnable transform: bake it first (ARC.bake, which Finalize runs)")
        if q.act_scale is not None:
            raise ValueError(f"{name} has a static activation scale: the integer kernels quantize activations "
                             f"dynamically; packing supports dynamic per-token/per-group activations")
        ws, as_ = q.weight_spec, q.act_spec
        if ws.enabled and not ws.symmetric:
            raise ValueError(f"{name}: asymmetric weights have no packed form (the kernels take symmetric codes)")
        k = q.in_features
        gw, ga = _spec_group(ws, k, "weight", name), _spec_group(as_, k, "activation", name)
        act_bits = as_.bits if as_.enabled else 32
        w = q.quantized_weight().detach()
        scale16 = None
        if ws.enabled:
            codes, scale = grid_codes(w, ws.bits, gw, name=name)
            scale16 = _to_fp16_scale(scale, name)
            g = gemm_group_size(k, gw, ga, act_bits)
            qweight = pack_int4(codes, g) if ws.bits <= 4 and g % 2 == 0 else codes
        else:
            qweight = w.clone()
        return cls(k, q.out_features, weight_bits=ws.bits if ws.enabled else 32, act_bits=act_bits,
                   weight_group_size=gw, act_group_size=ga, act_symmetric=as_.symmetric, qweight=qweight,
                   weight_scale=scale16, bias=None if q.bias is None else q.bias.detach().clone(),
                   smooth=q.smooth, rotation=q.input_rotation, perm=q.perm, name=name, role=getattr(q, "role", None),
                   lowrank_a=None if q.lowrank_a is None else q.lowrank_a.detach().clone(),
                   lowrank_b=None if q.lowrank_b is None else q.lowrank_b.detach().clone())

    @property
    def input_rotation(self) -> Rotation | None:
        return stored_rotation(self)

    def config(self) -> dict:
        """What a checkpoint's JSON records about this layer (rebuild with :meth:`from_config`)."""
        cfg = {key: getattr(self, key) for key in CONFIG_KEYS}
        cfg.update(weight_format=self.weight_format, pack_group_size=self.pack_group_size, bias=self.bias is not None,
                   transforms=[t for t in TRANSFORM_BUFFERS if getattr(self, t) is not None])
        if self.lowrank_a is not None:
            cfg["lowrank_rank"] = int(self.lowrank_a.shape[1])
        return cfg

    def tensors(self) -> dict[str, torch.Tensor]:
        """The persistent tensors, by local name (what a checkpoint stores under ``<layer name>.``)."""
        return {k: v for k, v in self.state_dict().items()}

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "PackedLinear":
        """Rebuild from :meth:`config` and :meth:`tensors`; a missing, extra or misshapen tensor is a ValueError."""
        name = cfg.get("name", "linear")
        wanted = {"qweight", *cfg.get("transforms", [])}
        if cfg.get("weight_format") != "float":
            wanted.add("weight_scale")
        if cfg.get("bias"):
            wanted.add("bias")
        if cfg.get("lowrank_rank"):
            wanted |= {"lowrank_a", "lowrank_b"}
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        if missing or extra:
            raise ValueError(f"{name}: tensors missing {missing}, unexpected {extra}")
        tensors = dict(tensors)
        if "rotation_left" in tensors or "rotation_right" in tensors:
            if "rotation_left" not in tensors or "rotation_right" not in tensors:
                raise ValueError(f"{name}: a Kronecker rotation needs both rotation_left and rotation_right")
            tensors["rotation"] = (tensors.pop("rotation_left"), tensors.pop("rotation_right"))
        layer = cls(**{k: cfg[k] for k in CONFIG_KEYS}, **tensors)
        if cfg.get("lowrank_rank") and cfg["lowrank_rank"] != layer.lowrank_a.shape[1]:
            raise ValueError(f"{name}: lowrank_rank {cfg['lowrank_rank']} in the config, the tensors have rank "
                             f"{layer.lowrank_a.shape[1]}")
        for key in ("weight_format", "pack_group_size"):
            if key in cfg and cfg[key] != getattr(layer, key):
                raise ValueError(f"{name}: {key} {cfg[key]!r} in the config, {getattr(layer, key)!r} from its bits "
                                 f"and group sizes")
        return layer

    # --- computation -----------------------------------------------------------------------
    def weight_codes(self) -> torch.Tensor:
        """Integer codes (N, K) int8 of the weight (not for FP weights)."""
        if self.weight_format == "int4":
            return unpack_int4(self.qweight, self.pack_group_size)
        if self.weight_format == "int8":
            return self.qweight
        raise ValueError(f"{self.name} keeps its weight in floating point: it has no codes")

    def dequantized_weight(self) -> torch.Tensor:
        """codes x FP16 scales, FP32 (N, K), in the transformed basis (what the fake quant multiplied with)."""
        if self.weight_format == "float":
            return self.qweight.float()
        scale = expand_groups(self.weight_scale.float(), self.weight_group_size)
        return self.weight_codes().float() * scale

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: codes plus scales (plus the low-rank branch's factors, if any)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.weight_scale, self.lowrank_a, self.lowrank_b)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = transform_input(x, self.smooth, self.input_rotation, self._perm_index)
        y = self._quantized_product(x, xt)
        if self.lowrank_a is not None:
            y = y + (xt @ self.lowrank_a.to(xt.dtype)) @ self.lowrank_b.to(xt.dtype)
        return y

    def _quantized_product(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        if self.weight_format == "float":
            if self.act_bits < 16:
                spec = QuantSpec(bits=self.act_bits, symmetric=self.act_symmetric, granularity="group",
                                 group_size=self.act_group_size)
                xt = fake_quant(xt, spec, name=self.name)
            return F.linear(xt, self.qweight.to(xt.dtype), None if self.bias is None else self.bias.to(xt.dtype))
        if self.act_bits >= 16:
            bias = None if self.bias is None else self.bias.to(xt.dtype)
            return F.linear(xt, self.dequantized_weight().to(xt.dtype), bias)
        x2 = xt.reshape(-1, self.in_features)
        y = self._integer_linear(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int4_kernels_apply(self, device: torch.device) -> bool:
        g = self.pack_group_size
        if self.weight_format != "int4" or self.act_bits > 4:
            return False
        return device.type != "cuda" or (g >= 32 and g & (g - 1) == 0)  # the Triton kernels' group sizes

    def _onednn_applies(self, device: torch.device) -> bool:
        """Per-channel weight x per-token activation (the GEMM's one group spans K) on a CPU with oneDNN."""
        return (device.type == "cpu" and self.weight_format != "float" and self.act_bits <= 8
                and self.pack_group_size == self.in_features and onednn.onednn_available())

    def _onednn_weight(self) -> "onednn.OnednnWeight":
        """The prepacked weight, built on first use and cached (not a buffer: never saved, rebuilt on load)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.weight_scale.data_ptr(), self.act_bits)
        cached = getattr(self, "_onednn_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, onednn.prepack_weight(self.weight_codes(), self.weight_scale.float(), self.act_bits))
            self._onednn_cache = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_onednn_cache", None)  # an opaque oneDNN tensor: no storage to copy or pickle; rebuilt on use
        return state

    def _integer_linear(self, x2: torch.Tensor) -> torch.Tensor:
        from tca_lightning import kernels

        if self._onednn_applies(x2.device):
            return onednn.onednn_linear(x2, self._onednn_weight(), self.act_symmetric, self.bias)
        g = self.pack_group_size
        fused = self.act_symmetric and self.act_bits == 4 and self.act_group_size == g  # w4a4_linear's own case
        if fused and self._int4_kernels_apply(x2.device):
            return kernels.w4a4_linear(x2, self.qweight, self._gemm_scale, self.bias, g, out_dtype=torch.float32)
        codes, a_scale, a_zero = quantize_act_codes(x2, self.act_bits, self.act_symmetric, self.act_group_size)
        factor = self.act_group_size // g
        a_scale = expand_groups(a_scale, factor)
        if self._int4_kernels_apply(x2.device):
            a_packed = pack_int4(codes, g)
            gemm = kernels.w4a4_gemm_triton if x2.is_cuda else kernels.w4a4_gemm_cpu
            y = gemm(a_packed, a_scale, self.qweight, self._gemm_scale, g, self.bias, torch.float32)
        else:
            y = int8_group_gemm(codes, a_scale, self.weight_codes(), self._gemm_scale, g, self.bias, torch.float32)
        if a_zero is not None:
            y = y - zero_point_correction(a_scale, expand_groups(a_zero, factor), self._gemm_scale, self._code_sums)
        return y

    def extra_repr(self) -> str:
        parts = [f"{self.in_features}->{self.out_features}", f"W{self.weight_bits}A{self.act_bits}",
                 f"{self.weight_format} weight", f"groups w{self.weight_group_size}/a{self.act_group_size}"]
        parts += [f"low rank {self.lowrank_a.shape[1]}"] if self.lowrank_a is not None else []
        return ", ".join(parts + [t for t in TRANSFORM_BUFFERS if getattr(self, t) is not None])

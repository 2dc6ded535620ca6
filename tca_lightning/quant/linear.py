"""QuantLinear: an nn.Linear with weight/input quantizers and an optional input transform.

Every method is a way of *setting* these parts: SmoothQuant sets ``smooth``; QuaRot sets
``rotation`` (dense, or TCA-DiT's Kronecker pair ``rotation_left`` ⊗ ``rotation_right``); RGQ sets ``perm``; SVDQuant sets ``lowrank_a``/``lowrank_b``; GPTQ replaces
``weight``; LWC learns ``clip_logit``; ViDiT-Q/PTQ4DiT set ``smooth`` from their own rules.
The forward is always the same fake-quant computation:

    x' = ((x / s) R)[..., P]                      (transform_input)
    W' = ((W diag(s)) R)[:, P] - (A B)^T           (fold_input_transform, minus the low-rank branch)
    y  = Q_a(x') Q_w(W')^T + b + (x' A) B

which equals x W^T + b exactly when quantization is disabled (bits >= 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tca_lightning.quant.quantizers import QuantSpec, fake_quant, fake_quant_static
from tca_lightning.quant.transforms import (TRANSFORM_BUFFERS, Rotation, check_rotation, fold_input_transform,
                                            rotation_buffers, stored_rotation, transform_input)


class QuantLinear(nn.Linear):
    """A subclass of nn.Linear, so model code and adapters that look for linears still find it."""

    FUSED_INPUT_MAP_MAX = 512  # a frozen layer keeps a dense (k, k) input map up to this k (1 MB in FP32)

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec,
                 act_spec: QuantSpec, name: str = "linear"):
        super().__init__(in_features, out_features, bias=bias)
        self.name = name
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        for buffer in TRANSFORM_BUFFERS + ("act_scale", "lowrank_a", "lowrank_b", "weight_q"):
            self.register_buffer(buffer, None)
        self.clip_logit: nn.Parameter | None = None  # learnable weight clipping (per output channel)
        self.transform: nn.Module | None = None  # a learnable input transform (ARC), applied after smooth/rotation/perm
        # a buffer (not persistent) so that module.to(device) moves it with the weight: Lightning moves the
        # model to the GPU after setup() has calibrated and frozen it
        self.register_buffer("_frozen_weight", None, persistent=False)
        self.register_buffer("_frozen_input_map", None, persistent=False)
        self._check_groups()

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec, name: str = "linear"):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec, name)
        q.weight.data.copy_(linear.weight.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def _check_groups(self) -> None:
        for kind, spec in (("weight", self.weight_spec), ("activation", self.act_spec)):
            if spec.enabled and spec.granularity == "group" and self.in_features % spec.group_size:
                raise ValueError(f"{kind} group_size {spec.group_size} does not divide in_features "
                                 f"{self.in_features} of {self.name}")

    # --- the parts methods set -----------------------------------------------------------
    def set_specs(self, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None) -> None:
        """Change the quantizers (e.g. a per-layer group size), validated against in_features."""
        old = self.weight_spec, self.act_spec
        self.weight_spec, self.act_spec = weight_spec or self.weight_spec, act_spec or self.act_spec
        try:
            self._check_groups()
        except ValueError:
            self.weight_spec, self.act_spec = old
            raise
        if weight_spec is not None and weight_spec != old[0]:
            self.weight_q = None  # calibrated weights (GPTQ) sit on the old weight grid; an activation change keeps them
        self.unfreeze()

    @property
    def input_rotation(self) -> Rotation | None:
        """The fixed rotation: a dense (k, k) matrix, a (left, right) Kronecker pair, or None."""
        return stored_rotation(self)

    def set_transform(self, smooth: torch.Tensor | None = None, rotation: Rotation | None = None,
                      perm: torch.Tensor | None = None) -> None:
        """Fix input transforms (each one given replaces its predecessor); ``rotation`` dense or Kronecker."""
        for name, value in (("smooth", smooth), ("perm", perm)):
            if value is not None:
                if tuple(value.shape) != (self.in_features,):
                    raise ValueError(f"{name} of {self.name} must have shape {(self.in_features,)}, "
                                     f"got {tuple(value.shape)}")
                setattr(self, name, value.detach().to(self.weight.device))
        if rotation is not None:
            for buffer, value in rotation_buffers(check_rotation(rotation, self.in_features, self.name)).items():
                setattr(self, buffer, None if value is None else value.detach().to(self.weight.device))
        self.weight_q = None  # a new basis invalidates an installed quantized weight
        self.unfreeze()

    def set_quantized_weight(self, weight_q: torch.Tensor) -> None:
        """Install an already-quantized transformed weight (on the grid, e.g. GPTQ's): forward and
        ``freeze`` use it as is instead of re-rounding ``weight`` (RTN would lose GPTQ's grid)."""
        if tuple(weight_q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of {self.name} must have shape {(self.out_features, self.in_features)}")
        self.unfreeze()
        self.weight_q = weight_q.detach().to(self.weight.device)

    def set_learnable_transform(self, transform: nn.Module) -> None:
        """A module with ``forward(x)`` and ``fold_weight(w)`` (e.g. quant.learnable.KronTransform)."""
        self.transform = transform
        self.weight_q = None
        self.unfreeze()

    def set_lowrank(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """FP branch y += (x' a) b, a: (in, r), b: (r, out); the quantized weight carries the residual."""
        self.lowrank_a, self.lowrank_b = a.detach().to(self.weight.device), b.detach().to(self.weight.device)
        self.weight_q = None
        self.unfreeze()

    def enable_weight_clipping(self, init_ratio: float = 1.0) -> nn.Parameter:
        """OmniQuant's learnable weight clipping: ratio = sigmoid(logit) per output channel (Shao et al. 2024)."""
        ratio = torch.full((self.out_features, 1), min(max(init_ratio, 1e-4), 1 - 1e-4))
        self.clip_logit = nn.Parameter(torch.log(ratio / (1 - ratio)).to(self.weight.device))
        return self.clip_logit

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A fresh QuantLinear has no transform buffers yet: take whichever a saved one had."""
        for name in TRANSFORM_BUFFERS + ("act_scale", "lowrank_a", "lowrank_b", "weight_q"):
            if prefix + name in state_dict and getattr(self, name) is None:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.weight.device)
        if prefix + "clip_logit" in state_dict and self.clip_logit is None:
            self.clip_logit = nn.Parameter(torch.empty_like(state_dict[prefix + "clip_logit"], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # --- computation ---------------------------------------------------------------------
    def transformed_weight(self) -> torch.Tensor:
        w = fold_input_transform(self.weight, self.smooth, self.input_rotation, self.perm)
        if self.transform is not None:
            w = self.transform.fold_weight(w)
        if self.lowrank_a is not None:
            w = w - (self.lowrank_a @ self.lowrank_b).t()
        return w

    def quantized_weight(self) -> torch.Tensor:
        if self._frozen_weight is not None:
            return self._frozen_weight
        if self.weight_q is not None:
            return self.weight_q
        w = self.transformed_weight()
        clip = None
        if self.clip_logit is not None:
            clip = torch.sigmoid(self.clip_logit)
            if self.weight_spec.granularity == "group":
                clip = clip[:, None, :]  # (out, 1, 1) against (out, groups, G)
            elif self.weight_spec.granularity == "tensor":
                clip = clip.max()
        return fake_quant(w, self.weight_spec, clip, self.name)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            return fake_quant_static(x, self.act_scale, self.act_spec)
        return fake_quant(x, self.act_spec, name=self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen_input_map is not None:
            xt = x @ self._frozen_input_map.to(x.dtype)
        else:
            xt = transform_input(x, self.smooth, self.input_rotation, self.perm)
        if self.transform is not None:
            xt = self.transform(xt)
        y = F.linear(self.quantize_input(xt), self.quantized_weight().to(x.dtype), self.bias)
        if self.lowrank_a is not None:
            y = y + (xt @ self.lowrank_a.to(x.dtype)) @ self.lowrank_b.to(x.dtype)
        return y

    def freeze(self) -> None:
        """Cache the fake-quantized weight (sampling calls forward thousands of times) and, for a rotated
        input of at most ``FUSED_INPUT_MAP_MAX`` features, the whole input transform as one dense matrix:
        x diag(1/s) R P in a single GEMM instead of a division, two Kronecker matmuls and a gather (5x
        faster at the tiny models' widths; equal to rounding)."""
        with torch.no_grad():
            self._frozen_weight = None
            self._frozen_input_map = None
            self._frozen_weight = self.quantized_weight().detach()
            rotation = self.input_rotation
            if rotation is not None and self.in_features <= self.FUSED_INPUT_MAP_MAX:
                eye = torch.eye(self.in_features, dtype=torch.float64, device=self.weight.device)
                rotation = tuple(f.double() for f in rotation) if isinstance(rotation, tuple) else rotation.double()
                smooth = None if self.smooth is None else self.smooth.double()
                self._frozen_input_map = transform_input(eye, smooth, rotation, self.perm).float()

    def unfreeze(self) -> None:
        self._frozen_weight = None
        self._frozen_input_map = None

    def extra_repr(self) -> str:
        parts = [f"{self.in_features}->{self.out_features}", f"W{self.weight_spec.bits}A{self.act_spec.bits}"]
        parts += [p for p in ("smooth", "rotation", "perm", "lowrank_a", "act_scale") if getattr(self, p) is not None]
        parts += ["kron rotation"] if self.rotation_left is not None else []
        return ", ".join(parts)

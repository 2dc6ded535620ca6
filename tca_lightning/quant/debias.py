"""Noise-debiased GELU: remove the mean shift that quantization noise causes through a curved activation.

A quantized fc1 computes y + n, n the (zero-mean) error of the 4-bit inputs and weights. GELU is convex
around 0, so E[GELU(y + n)] = GELU(y) + 1/2 GELU''(y) E[n^2] + O(n^4) (second-order Taylor, Jensen): every
hidden channel is pushed up by a bias of the same sign, fc2 sums hundreds of them, and the sampler
accumulates the result over its steps, which shows in FID's mean term while PSNR barely moves (issue 4,
benchmarks/results/output_bias_probe*.md). The correction subtracts that expectation,

    GELU~(y) = GELU(y) - 1/2 sigma_c^2 GELU''(y),

with sigma_c^2 the calibrated variance of fc1's quantization error per output channel. It is an elementwise
epilogue (one multiply-add per hidden unit), so it works on the fake-quant model and after the packed INT4
kernel alike. The same idea corrects a layer's own mean error in data-free quantization (bias correction,
Nagel et al., ICCV 2019) and the correlated part of the diffusion noise in PTQD (He et al., NeurIPS 2023);
here it is carried through the activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715  # the tanh approximation's cubic coefficient (Hendrycks and Gimpel, 2016)


def gelu_second_derivative(y: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d^2/dy^2 of F.gelu(y, approximate=approximate), in closed form."""
    if approximate == "none":
        pdf = torch.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)
        return pdf * (2.0 - y * y)
    if approximate != "tanh":
        raise ValueError(f"approximate must be 'none' or 'tanh' (F.gelu's options), got {approximate!r}")
    u = SQRT_2_OVER_PI * (y + TANH_CUBIC * y ** 3)
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * y * y)
    d2u = SQRT_2_OVER_PI * 6.0 * TANH_CUBIC * y
    t = torch.tanh(u)
    sech2 = 1.0 - t * t
    return sech2 * du + 0.5 * y * (sech2 * d2u - 2.0 * t * sech2 * du * du)


def debiased_gelu(y: torch.Tensor, noise_var: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(y) minus the second-order mean shift of zero-mean noise of variance ``noise_var`` (per channel)."""
    return F.gelu(y, approximate=approximate) - 0.5 * noise_var.to(y.dtype) * gelu_second_derivative(y, approximate)


class DebiasedGELU(nn.Module):
    """diffusers' ``GELU`` (a projection, then GELU) with the noise debias in its epilogue.

    It keeps the projection as ``proj``, so the quantized linear's name (``...ff.net.0.proj``) is unchanged.
    """

    def __init__(self, proj: nn.Module, approximate: str, noise_var: torch.Tensor):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        out = getattr(proj, "out_features", None)
        if noise_var.ndim != 1 or (out is not None and noise_var.numel() != out):
            raise ValueError(f"noise_var must be one variance per output channel ({out}), got shape "
                             f"{tuple(noise_var.shape)}")
        if bool((noise_var < 0).any()) or not bool(torch.isfinite(noise_var).all()):
            raise ValueError("noise_var must be finite and non-negative (a variance)")
        self.proj, self.approximate = proj, approximate
        self.register_buffer("noise_var", noise_var.detach().float().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return debiased_gelu(self.proj(hidden_states), self.noise_var, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, mean noise_var={float(self.noise_var.mean()):.3g}"


def gelu_parents(transformer: nn.Module, linear_names) -> dict[str, nn.Module]:
    """{name of the GELU module: module} for every linear in ``linear_names`` that is a GELU's ``proj``."""
    from diffusers.models.activations import GELU

    parents = {}
    for name in linear_names:
        parent_name, _, leaf = name.rpartition(".")
        if leaf != "proj" or not parent_name:
            continue
        parent = transformer.get_submodule(parent_name)
        if isinstance(parent, (GELU, DebiasedGELU)):
            parents[parent_name] = parent
    return parents


def install_debiased_gelu(transformer: nn.Module, noise_vars: dict[str, torch.Tensor]) -> list[str]:
    """Replace each GELU named in ``noise_vars`` (module name -> variance per channel) by a DebiasedGELU."""
    from diffusers.models.activations import GELU

    done = []
    for name, var in noise_vars.items():
        module = transformer.get_submodule(name)
        if isinstance(module, DebiasedGELU):
            module.noise_var.copy_(var.to(module.noise_var))
        elif isinstance(module, GELU):
            device = next(iter([*module.proj.parameters(), *module.proj.buffers()]), var).device
            transformer.set_submodule(name, DebiasedGELU(module.proj, module.approximate, var.to(device)))
        else:
            raise ValueError(f"{name} is a {type(module).__name__}, not diffusers' GELU: nothing to debias")
        done.append(name)
    return done


def remove_debiased_gelu(transformer: nn.Module) -> None:
    """Put diffusers' plain GELU back wherever a DebiasedGELU is (the projection is kept)."""
    from diffusers.models.activations import GELU

    for name, module in list(transformer.named_modules()):
        if isinstance(module, DebiasedGELU):
            plain = GELU(module.proj.in_features, module.proj.out_features, module.approximate,
                         bias=module.proj.bias is not None)
            plain.proj = module.proj
            transformer.set_submodule(name, plain)

"""Quantization methods: each sets the parts of QuantLinears from calibration statistics."""

from tca_lightning.methods.base import QuantMethod, QuantRecipe, wrap_linears
from tca_lightning.methods.smoothing import RTN, QuaRot, SmoothQuant

__all__ = ["QuantMethod", "QuantRecipe", "QuaRot", "RTN", "SmoothQuant", "wrap_linears"]

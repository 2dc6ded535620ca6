"""Quantization methods: each sets the parts of QuantLinears from calibration statistics."""

from tca_lightning.methods.base import QuantMethod, QuantRecipe, wrap_linears
from tca_lightning.methods.gptq import GPTQ
from tca_lightning.methods.ptq4dit import PTQ4DiT
from tca_lightning.methods.qdit import QDiT
from tca_lightning.methods.smoothing import RTN, QuaRot, SmoothQuant
from tca_lightning.methods.svdquant import SVDQuant
from tca_lightning.methods.viditq import ViDiTQ

__all__ = ["GPTQ", "PTQ4DiT", "QDiT", "QuantMethod", "QuantRecipe", "QuaRot", "RTN", "SVDQuant", "SmoothQuant", "ViDiTQ",
           "wrap_linears"]

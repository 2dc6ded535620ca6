"""tca_lightning: TCA-DiT post-training quantization of Diffusion Transformers on PyTorch Lightning."""

from tca_lightning.export import load_quantized, save_quantized
from tca_lightning.models.adapters import Condition, DiffusionAdapter, get_adapter
from tca_lightning.models.loading import ModelNotFoundError, load_model
from tca_lightning.models.samplers import SamplerConfig, sample

__version__ = "0.1.0"
__all__ = ["Condition", "DiffusionAdapter", "ModelNotFoundError", "SamplerConfig", "get_adapter", "load_model",
           "load_quantized", "sample", "save_quantized"]

"""Lightning callbacks: the finalize step of TCA-DiT (RGQ, GPTQ, checkpoint) and the anomaly figures."""

from tca_lightning.callbacks.finalize import Finalize, reorder_groups

__all__ = ["Finalize", "reorder_groups"]

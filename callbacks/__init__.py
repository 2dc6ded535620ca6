"""Lightning callbacks: the finalize step of TCA-DiT (RGQ, GPTQ, checkpoint), on-policy calibration states and the
anomaly figures."""

from tca_lightning.callbacks.finalize import Finalize, reorder_groups
from tca_lightning.callbacks.on_policy import OnPolicyStates

__all__ = ["Finalize", "OnPolicyStates", "reorder_groups"]

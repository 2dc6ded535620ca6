"""Data: the embedded MNIST digits, sampling conditions, and (later) ATG calibration data."""

from tca_lightning.data.conditions import ConditionDataset, SamplingDataModule

__all__ = ["ConditionDataset", "SamplingDataModule"]

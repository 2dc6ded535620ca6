"""Data: the embedded MNIST digits, sampling conditions, and the ATG calibration data of TCA-DiT."""

from tca_lightning.data.atg_datamodule import ATGDataModule, CalibrationItems
from tca_lightning.data.calibration import CalibrationConfig
from tca_lightning.data.conditions import ConditionDataset, SamplingDataModule

__all__ = ["ATGDataModule", "CalibrationConfig", "CalibrationItems", "ConditionDataset", "SamplingDataModule"]

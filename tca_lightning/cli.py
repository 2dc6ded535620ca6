"""``python -m tca_lightning {fit,test,...} --config configs/<model>.yaml`` (LightningCLI).

The YAML picks the LightningModule (``model.class_path``) and the DataModule
(``data.class_path``); layer ``configs/smoke.yaml`` on top to shrink every budget.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class TCACLI(LightningCLI):
    """LightningCLI with any LightningModule/DataModule subclass selectable from YAML."""


def main(args=None) -> TCACLI:
    return TCACLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )

"""``python -m tca_lightning {fit,test,...} --config configs/<model>.yaml`` (LightningCLI).

The YAML picks the LightningModule (``model.class_path``) and the DataModule
(``data.class_path``); layer ``configs/smoke.yaml`` on top to shrink every budget. ``fit``
calibrates and then, unless ``--evaluate_after_fit false``, runs ``test`` on the result with the
same trainer, so one command leaves metrics.json next to the loss curves.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class TCACLI(LightningCLI):
    """LightningCLI with any LightningModule/DataModule subclass selectable from YAML."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--evaluate_after_fit", type=bool, default=True,
                            help="after fit, evaluate the calibrated model (Trainer.test) into metrics.json")

    def after_fit(self) -> None:
        if not self.config["fit"].get("evaluate_after_fit", True) or self.trainer.interrupted:
            return
        if callable(getattr(self.datamodule, "test_dataloader", None)) and hasattr(self.model, "test_step"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args=None) -> TCACLI:
    return TCACLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )

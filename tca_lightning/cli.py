"""``python -m tca_lightning {fit,test,...} --config configs/<model>.yaml`` (LightningCLI).

The YAML picks the LightningModule (``model.class_path``) and the DataModule
(``data.class_path``); layer ``configs/smoke.yaml`` on top to shrink every budget. ``fit``
calibrates and then, unless ``--evaluate_after_fit false``, runs ``test`` on the result with the
same trainer, so one command leaves metrics.json next to the loss curves. ``test --quantized PATH``
evaluates a packed checkpoint (written by ``fit``) with the integer kernels.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class TCACLI(LightningCLI):
    """LightningCLI with any LightningModule/DataModule subclass selectable from YAML."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--evaluate_after_fit", type=bool, default=True,
                            help="after fit, evaluate the calibrated model (Trainer.test) into metrics.json")
        parser.add_argument("--quantized", type=Optional[str], default=None,
                            help="test/predict: a packed checkpoint (<run>/quantized from fit) evaluated with the "
                                 "integer kernels; shorthand for --model.init_args.quantized PATH")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        path = config.get("quantized")
        if path is None:
            return
        if self.subcommand == "fit":
            raise ValueError("--quantized evaluates a packed checkpoint: use it with `test` (or `predict`), "
                             "not `fit`, which writes one to <run>/quantized")
        init_args = config.get("model", {}).get("init_args") or {}
        if "quantized" not in init_args:
            raise ValueError(f"--quantized needs a model that evaluates packed checkpoints "
                             f"(tca_lightning.DiffusionEvaluator or a subclass); {config.model.class_path} has no "
                             "`quantized` argument")
        config["model.init_args.quantized"] = path

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

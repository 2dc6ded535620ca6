"""``python -m tca_lightning {fit,test,...} --config configs/<model>.yaml`` (LightningCLI).

The YAML picks the LightningModule (``model.class_path``) and the DataModule
(``data.class_path``); layer ``configs/smoke.yaml`` on top to shrink every budget. ``fit``
calibrates and then, unless ``--evaluate_after_fit false``, runs ``test`` on the result with the
same trainer, so one command leaves metrics.json next to the loss curves. ``test --quantized PATH``
evaluates a packed checkpoint (written by ``fit``) with the integer kernels.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("lightning.pytorch.cli.tca")  # Lightning's handler: shown even with warnings ignored

# Model settings that only shape an evaluation: with ``test``/``predict --ckpt_path`` the command line and
# config keep them (evaluate a calibrated checkpoint at 100 steps, another seed, another reference) instead
# of the checkpoint's, which Lightning's CLI would otherwise restore silently.
EVALUATION_KEYS = ("sampler", "reference", "reference_cache", "real_images", "classifier", "kid_subset_size",
                   "grid_samples", "sample_dir", "real_image_size", "clip_model")


def _flat(tree, prefix: str = "") -> dict:
    if hasattr(tree, "as_dict"):
        tree = tree.as_dict()
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class TCACLI(LightningCLI):
    """LightningCLI with any LightningModule/DataModule subclass selectable from YAML."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--evaluate_after_fit", type=bool, default=True,
                            help="after fit, evaluate the calibrated model (Trainer.test) into metrics.json")
        parser.add_argument("--quantized", type=Optional[str], default=None,
                            help="test/predict: a packed checkpoint (<run>/quantized from fit) evaluated with the "
                                 "integer kernels; shorthand for --model.init_args.quantized PATH")

    def _parse_ckpt_path(self) -> None:
        """Lightning's (the checkpoint's model hyperparameters replace the config's), plus: evaluation-only
        settings stay the command line's for test/predict, and every other replaced setting is named."""
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return super()._parse_ckpt_path()
        given = copy.deepcopy(self.config[subcommand].get("model"))
        super()._parse_ckpt_path()
        model = self.config[subcommand].get("model")
        if given is None or model is None or given.get("class_path") != model.get("class_path"):
            return
        keep = subcommand in ("test", "predict", "validate")
        for key in EVALUATION_KEYS if keep else ():
            if key in (given.get("init_args") or {}):
                model["init_args"][key] = copy.deepcopy(given["init_args"][key])
        before, after = _flat(given.get("init_args")), _flat(model.get("init_args"))
        replaced = [f"{k} ({before[k]!r} -> {after[k]!r})" for k in sorted(before) if k in after and before[k] != after[k]]
        if replaced and rank_zero_only.rank == 0:
            log.warning(f"--ckpt_path: the checkpoint's hyperparameters replace the config's model settings "
                           f"{', '.join(replaced)}" + (f"; evaluation settings ({', '.join(EVALUATION_KEYS)}) keep "
                                                       "the config's" if keep else ""))

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

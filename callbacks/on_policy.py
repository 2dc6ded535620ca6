"""On-policy calibration states: part-way through ARC, re-sample the calibration trajectories with the
model being calibrated, so the rest of the fit learns at the x_t the quantized model visits at inference.

Why: every ARC loss is computed at states of the FP model's trajectories, but at inference the quantized
model's own errors move x_t, step after step; on tiny-pixart the resulting drift (a brightness shift of
the samples) is most of W4A4's FID gap, and it is absent from the FP states (benchmarks/results/
output_bias_probe.md). The teacher's targets are recomputed at whatever state an item holds, so this is
DAgger's remedy for compounding errors (Ross, Gordon & Bagnell, AISTATS 2011) applied to PTQ calibration.

The states sampled at a refresh are kept in the checkpoint, so a fit resumed after it streams the very
states the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import torch

from tca_lightning.data.calibration import Trajectories


class OnPolicyStates(pl.Callback):
    def __init__(self, start_epoch: int = 2, every_n_epochs: int = 0, progress: bool = True):
        """
        Args:
            start_epoch: the epoch (0-based) from which the items hold the quantized model's states; the
                epochs before it learn on the FP trajectories, so the first re-sampling is by a model that
                already quantizes well.
            every_n_epochs: re-sample again every this many epochs after ``start_epoch`` (0: once).
            progress: a progress bar while sampling.
        """
        if start_epoch < 1:
            raise ValueError(f"start_epoch must be >= 1 (epoch 0 calibrates on the FP trajectories, so the first "
                             f"re-sampling has a calibrated model to sample with), got {start_epoch}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: re-sample once, at start_epoch), got {every_n_epochs}")
        self.start_epoch, self.every_n_epochs, self.progress = start_epoch, every_n_epochs, progress
        self._states: Trajectories | None = None
        self._sampled_at: int | None = None
        self._pending: dict | None = None  # a checkpoint's states, until the datamodule has its conditions

    def due(self, epoch: int) -> int | None:
        """The latest scheduled re-sampling epoch at or before ``epoch`` (None: still on the FP states)."""
        if epoch < self.start_epoch:
            return None
        if self.every_n_epochs == 0:
            return self.start_epoch
        return self.start_epoch + (epoch - self.start_epoch) // self.every_n_epochs * self.every_n_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.due(trainer.current_epoch)
        if due is None:
            return
        dm = trainer.datamodule
        if not hasattr(dm, "resample_with"):
            raise TypeError(f"OnPolicyStates re-samples the calibration states of an ATGDataModule; "
                            f"the datamodule is {type(dm).__name__}")
        if self._sampled_at == due and self._states is not None:
            if dm.states is not self._states:  # resumed from a checkpoint taken after the re-sampling
                dm.use_states(self._states)
            return
        with torch.no_grad(), torch.nn.utils.parametrize.cached():
            self._states = dm.resample_with(pl_module.adapter, progress=self.progress and trainer.is_global_zero
                                             and trainer.progress_bar_callback is not None)
        self._sampled_at = due
        shift = (self._states.x - dm.traj.x).pow(2).mean().sqrt() / dm.traj.x.pow(2).mean().sqrt()
        pl_module.log("on_policy/state_shift", shift.to(pl_module.device))

    def state_dict(self) -> dict:
        if self._states is None:
            return {}
        return {"sampled_at": self._sampled_at, "x": self._states.x, "timesteps": self._states.timesteps}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._sampled_at = state_dict["sampled_at"]
        self._pending, self._states = state_dict, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint's states: rebuilt around the datamodule's conditions once it has set up."""
        if self._pending is None:
            return
        self._states = dataclasses.replace(trainer.datamodule.traj, x=self._pending["x"],
                                           timesteps=self._pending["timesteps"])
        self._pending = None

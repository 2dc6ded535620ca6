"""The calibration DataModule of TCA-DiT: FP trajectories -> anomaly signatures -> ATG groups -> items.

``prepare_data`` (rank 0) samples the FP model's trajectories and caches them; ``setup`` (every
rank) loads them, computes per-timestep input statistics, clusters the timesteps (faiss) and
keeps the items at the K representative steps — every condition at each — with the group's
weight. Under DDP, Lightning's distributed sampler gives each rank its own shard of items.

The model, sampler and calibration budget are, by default, those of the LightningModule being
fit (``calibration_source()``), so a config states them once and the trajectories are the very
ones the baselines calibrate on (same cache key). ``test`` streams the evaluation's conditions
(SamplingDataModule), so ``fit`` can evaluate its result with the same DataModule.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tca_lightning.data.atg import SELECTIONS, TimestepGroups, anomaly_signatures, select_timesteps
from tca_lightning.data.calibration import (CalibrationConfig, LinearStats, Trajectories, calibration_trajectories,
                                           collect_linear_stats, generate_trajectories, slice_condition)
from tca_lightning.data.conditions import SamplingDataModule
from tca_lightning.models.adapters import DiffusionAdapter, get_adapter
from tca_lightning.models.loading import load_model
from tca_lightning.models.samplers import SamplerConfig


class CalibrationItems(Dataset):
    """(x_t, timestep, condition fields, weight, group) for every condition at every representative step."""

    def __init__(self, traj: Trajectories, groups: TimestepGroups):
        self.traj, self.groups = traj, groups
        self.n = traj.x.shape[1]

    def __len__(self) -> int:
        return self.groups.k * self.n

    def __getitem__(self, i: int) -> dict:
        g, j = divmod(i, self.n)
        step = int(self.groups.representatives[g])
        item = {"x": self.traj.x[step, j], "timestep": self.traj.timesteps[step], "group": g,
                "weight": self.groups.weights[g]}
        for key, value in asdict(self.traj.cond).items():
            if value is not None:
                item[key] = value[j]
        return item


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a run resumed from a checkpoint sees the very
    batches the uninterrupted run would have (Lightning calls ``set_epoch`` on samplers that have it)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ATGDataModule(SamplingDataModule):
    def __init__(self, k: int = 5, selection: str = "atg", calib_batch_size: int = 32, num_workers: int = 0,
                 model: str | None = None, sampler: SamplerConfig | None = None,
                 calibration: CalibrationConfig | None = None, num_samples: int = 1000, batch_size: int = 100,
                 num_classes: int = 10, seed: int = 0, captions: str | None = None):
        """
        Args:
            k: timestep groups (ATG) or uniformly spaced timesteps (``uniform``); ignored for ``all``.
                DESIGN.md: ATG should match all-T at K ~ T/5.
            selection: ``atg`` (TCA-DiT), ``uniform`` or ``all`` (the ablation baselines).
            calib_batch_size: calibration items per training step and device.
            num_workers: DataLoader workers of the calibration items.
            model: the FP model whose trajectories are the calibration data (default: the LightningModule's).
            sampler: scheduler and guidance of the trajectories (default: the LightningModule's).
            calibration: conditions, trajectory steps, noise seed, cache (default: the LightningModule's).
            num_samples: images ``test`` generates and scores (SamplingDataModule).
            batch_size: images per sampler call in ``test``.
            num_classes: class labels cycle over ``range(num_classes)`` in ``test``.
            seed: style words of ``test``'s captions.
            captions: caption file of ``test``'s conditions (caption models; SamplingDataModule).
        """
        super().__init__(num_samples=num_samples, batch_size=batch_size, num_classes=num_classes, seed=seed,
                         captions=captions)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if k < 1 or calib_batch_size < 1:
            raise ValueError(f"k ({k}) and calib_batch_size ({calib_batch_size}) must be >= 1")
        # kept out of hparams: they default to the LightningModule's, and Lightning refuses differing duplicates
        self.save_hyperparameters(ignore=["model", "sampler", "calibration"])
        self.model_name, self.sampler, self.calibration = model, sampler, calibration
        self.traj: Trajectories | None = None
        self.stats: LinearStats | None = None
        self.groups: TimestepGroups | None = None
        self.signatures: torch.Tensor | None = None  # (T, D) what ATG clustered (selection "atg")
        self.states: Trajectories | None = None  # what the items read: traj, or on-policy states (resample_with)
        self._items: CalibrationItems | None = None
        self._resolved = None
        self.seconds = 0.0  # trajectories + statistics + clustering: part of the calibration time

    def _source(self) -> tuple[str, DiffusionAdapter, SamplerConfig, CalibrationConfig]:
        if self._resolved is None:
            self._resolved = self._resolve_source()
        return self._resolved

    def _resolve_source(self) -> tuple[str, DiffusionAdapter, SamplerConfig, CalibrationConfig]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.model_name is None:
            if module is None or not hasattr(module, "calibration_source"):
                raise ValueError("ATGDataModule needs model=... (a model id) when the LightningModule it feeds has no "
                                 "calibration_source() (tca_lightning.arc.ARC has one)")
            name, adapter, sampler, calibration = module.calibration_source()
        else:
            name = self.model_name
            loaded = load_model(name)
            adapter = get_adapter(loaded.transformer, loaded.caption_encoder)
            sampler, calibration = None, None
            if module is not None and hasattr(module, "calibration_source"):
                _, _, sampler, calibration = module.calibration_source()
        sampler = self._as(self.sampler, SamplerConfig) or sampler or SamplerConfig()
        calibration = self._as(self.calibration, CalibrationConfig) or calibration or CalibrationConfig()
        return name, adapter, sampler, calibration

    @staticmethod
    def _as(value, cls):
        return cls(**value) if isinstance(value, dict) else value

    def _trajectories(self) -> Trajectories:
        name, adapter, sampler, calibration = self._source()
        self._adapter, self._calibration = adapter, calibration
        return calibration_trajectories(adapter, sampler, calibration, name)

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return  # test/predict evaluate: nothing to calibrate
        start = time.perf_counter()
        name, adapter, sampler, calibration = self._source()
        if calibration.cache_dir is not None:  # rank 0 fills the cache; setup() on every rank reads it
            calibration_trajectories(adapter, sampler, calibration, name)
        self.seconds += time.perf_counter() - start

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit", "validate") or self.groups is not None:
            return
        start = time.perf_counter()
        self.traj = self._trajectories()
        self.stats = collect_linear_stats(self._adapter, self.traj, batch_size=self._calibration.batch_size)
        self.signatures = anomaly_signatures(self.stats.absmax) if self.hparams.selection == "atg" else None
        self.groups = select_timesteps(self.hparams.selection, self.traj.num_steps, self.hparams.k, self.signatures,
                                       seed=self._calibration.seed)
        self.states = self.traj
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def resample_with(self, adapter: DiffusionAdapter, progress: bool = False) -> Trajectories:
        """Re-sample the calibration trajectories with ``adapter`` (e.g. the model being calibrated, fake-
        quantized) from the same noise, conditions and sampler, and stream its states from now on.

        On-policy calibration: the FP trajectories are not the states the quantized model visits at
        inference, where its own errors have moved x_t; the teacher's targets are recomputed at whatever
        x_t an item holds, so only the states change. ATG's groups and weights stay those of the FP run.
        Every rank samples all conditions (identical models, so identical states: no communication).
        """
        if self.traj is None:
            raise RuntimeError("ATGDataModule.setup('fit') has not run: use it through Trainer.fit")
        n, chunk = self.traj.x.shape[1], self._calibration.batch_size
        device = next(adapter.transformer.parameters()).device
        parts = [generate_trajectories(adapter, slice_condition(self.traj.cond, lo, lo + chunk).to(device),
                                       list(range(lo, min(lo + chunk, n))), self.traj.sampler, progress=progress)
                 for lo in range(0, n, chunk)]
        states = dataclasses.replace(self.traj, x=torch.cat([p.x for p in parts], dim=1), timesteps=parts[0].timesteps)
        if not torch.equal(states.timesteps, self.traj.timesteps):
            raise RuntimeError("re-sampled trajectories have other timesteps than the calibration's: "
                               f"{states.timesteps.tolist()} vs {self.traj.timesteps.tolist()}")
        self.use_states(states)
        return states

    def use_states(self, states: Trajectories) -> None:
        """Stream the items from ``states`` (same shape and timesteps as the FP trajectories)."""
        if self.traj is not None and states.x.shape != self.traj.x.shape:
            raise ValueError(f"calibration states of shape {tuple(states.x.shape)} do not match the trajectories' "
                             f"{tuple(self.traj.x.shape)}: they come from another calibration budget")
        self.states = states
        if self._items is not None:
            self._items.traj = states  # the DataLoader's dataset: its next epoch reads the new states

    def train_dataloader(self) -> DataLoader:
        if self.groups is None:
            raise RuntimeError("ATGDataModule.setup('fit') has not run: use it through Trainer.fit")
        items = self._items = CalibrationItems(self.states, self.groups)
        return DataLoader(items, batch_size=self.hparams.calib_batch_size,
                          sampler=EpochShuffle(len(items), self._calibration.seed), num_workers=self.hparams.num_workers, drop_last=False)

    def summary(self) -> dict:
        """What metrics.json records about the calibration data."""
        if self.groups is None:
            return {}
        return {"timestep_selection": self.hparams.selection, "calib_groups": self.groups.k,
                "calib_timesteps": [int(self.traj.timesteps[r]) for r in self.groups.representatives],
                "calib_weights": [round(float(w), 4) for w in self.groups.weights],
                "calib_items": len(CalibrationItems(self.traj, self.groups))}

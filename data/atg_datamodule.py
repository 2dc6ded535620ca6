"""The calibration DataModule of TCA-DiT: FP trajectories -> anomaly signatures -> ATG groups -> items.

``prepare_data`` (rank 0) samples the FP model's trajectories and caches them; ``setup`` (every
rank) loads them, computes per-timestep input statistics, clusters the timesteps (faiss) and
keeps the items at the K representative steps — every condition at each — with the group's
weight. Under DDP, Lightning's distributed sampler gives each rank its own shard of items.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tca_lightning.data.atg import SELECTIONS, TimestepGroups, anomaly_signatures, select_timesteps
from tca_lightning.data.calibration import LinearStats, Trajectories, cached_trajectories, collect_linear_stats
from tca_lightning.data.conditions import batch_condition, condition_batch
from tca_lightning.models.adapters import get_adapter
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


class ATGDataModule(L.LightningDataModule):
    def __init__(self, model: str = "tiny-dit", sampler: SamplerConfig = SamplerConfig(), num_conditions: int = 64,
                 k: int = 10, selection: str = "atg", batch_size: int = 32, seed: int = 1000,
                 cache_dir: str | None = "cache/calibration", num_workers: int = 0):
        """
        Args:
            model: the FP model whose trajectories are the calibration data (same string as the module's).
            sampler: sampler of the trajectories: the evaluation's scheduler, steps and guidance.
            num_conditions: conditions (class labels / captions) sampled.
            k: timestep groups (ATG) or uniformly spaced timesteps (``uniform``); ignored for ``all``.
            selection: ``atg`` (TCA-DiT), ``uniform`` or ``all`` (the ablation baselines).
            batch_size: calibration items per step and device.
            seed: noise seed of the trajectories (never the evaluation's).
            cache_dir: where trajectories are cached (None: regenerate).
            num_workers: DataLoader workers.
        """
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if num_conditions < 1 or k < 1 or batch_size < 1:
            raise ValueError(f"num_conditions ({num_conditions}), k ({k}) and batch_size ({batch_size}) must be >= 1")
        self.save_hyperparameters()
        self.sampler = sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(**sampler)
        self.traj: Trajectories | None = None
        self.stats: LinearStats | None = None
        self.groups: TimestepGroups | None = None

    def _trajectories(self) -> Trajectories:
        hp = self.hparams
        loaded = load_model(hp.model)
        adapter = get_adapter(loaded.transformer, loaded.caption_encoder)
        batch = condition_batch(hp.num_conditions, seed=hp.seed)
        sampler = SamplerConfig(scheduler=self.sampler.scheduler, num_steps=self.sampler.num_steps,
                                guidance_scale=self.sampler.guidance_scale, seed=hp.seed)
        self._adapter = adapter
        return cached_trajectories(adapter, batch_condition(adapter, batch), batch["index"], sampler,
                                   hp.cache_dir, hp.model)

    def prepare_data(self) -> None:
        if self.hparams.cache_dir is not None:
            self._trajectories()  # rank 0 fills the cache; setup() on every rank reads it

    def setup(self, stage: str | None = None) -> None:
        if self.groups is not None:
            return
        self.traj = self._trajectories()
        self.stats = collect_linear_stats(self._adapter, self.traj, batch_size=self.hparams.batch_size * 2)
        signatures = anomaly_signatures(self.stats.absmax) if self.hparams.selection == "atg" else None
        self.groups = select_timesteps(self.hparams.selection, self.traj.num_steps, self.hparams.k, signatures,
                                       seed=self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(CalibrationItems(self.traj, self.groups), batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, drop_last=False)

"""The conditions to sample for evaluation: which class / caption sample ``i`` asks for.

Sample ``i`` always asks for the same thing (class ``i mod num_classes``; for caption models a
caption naming that class, with style words drawn from ``i``, or caption ``i mod len`` of a
user-given caption file: COCO, MJHQ-30K, txt), and its noise is seeded by
``i`` in the sampler, so a run's sample set is the same for any batch size or device count.
Batches are fixed blocks of indices (batch ``b`` holds ``b*B .. b*B+B-1``) dealt round-robin to
the ranks, so batch ``b`` is the same computation on 1 or 8 devices: its saved shard
(``DiffusionEvaluator.sample_dir``) is byte-identical, and a run interrupted on one device count
resumes on another.
"""

from __future__ import annotations

import lightning as L
import torch
from collections.abc import Sequence

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tca_lightning.models.captions import SLANT_WORDS, THICKNESS_WORDS, make_caption


class ConditionDataset(Dataset):
    def __init__(self, num_samples: int, num_classes: int, seed: int, captions: Sequence[str] | None = None):
        self.num_samples, self.num_classes, self.seed, self.captions = num_samples, num_classes, seed, captions

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        label = index % self.num_classes
        if self.captions:
            return {"index": index, "label": label, "caption": self.captions[index % len(self.captions)]}
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        thickness, slant, keep_t, keep_s = torch.randint(0, 6, (4,), generator=g).tolist()
        caption = make_caption(label % 10, thickness % len(THICKNESS_WORDS) if keep_t % 2 else None,
                               slant % len(SLANT_WORDS) if keep_s % 2 else None)
        return {"index": index, "label": label, "caption": caption}


class ConditionBatches(Dataset):
    """Batch ``b`` of a ConditionDataset: items ``b*B .. min(b*B+B, N)-1`` collated, with ``batch`` = b
    and ``batch_size`` = B (what a sample shard's name and key depend on)."""

    def __init__(self, conditions: ConditionDataset, batch_size: int):
        self.conditions, self.batch_size = conditions, batch_size

    def __len__(self) -> int:
        return -(-len(self.conditions) // self.batch_size)

    def __getitem__(self, b: int) -> dict:
        first = b * self.batch_size
        count = min(self.batch_size, len(self.conditions) - first)
        batch = condition_batch(count, self.conditions.num_classes, self.conditions.seed, offset=first,
                                captions=self.conditions.captions)
        return {**batch, "batch": b, "batch_size": self.batch_size}


class RankBatches(DistributedSampler):
    """Batches ``rank, rank + world, ...``: no padding, no repeats (a DistributedSampler repeats samples to
    even out the ranks, which would count them twice in FID). Lightning leaves a DistributedSampler alone."""

    def __init__(self, batches: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(batches, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class SamplingDataModule(L.LightningDataModule):
    """Streams sample indices with their requested class and caption to ``test``/``predict``."""

    def __init__(self, num_samples: int = 1000, batch_size: int = 100, num_classes: int = 10, seed: int = 0,
                 captions: str | None = None):
        """
        Args:
            num_samples: how many images to generate and score.
            batch_size: images per sampler call (per device); memory, not results, depends on it.
            num_classes: class labels cycle over ``range(num_classes)``.
            seed: selects the style words of captions; the noise seed lives in the sampler config.
            captions: a caption file for caption models (COCO captions JSON, MJHQ-30K meta_data.json, txt,
                jsonl; tca_lightning.models.text_encoders.read_captions); sample i asks for caption i mod len.
                None: the tiny model's digit captions.
        """
        super().__init__()
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
        self.save_hyperparameters()
        self.dataset = ConditionDataset(num_samples, num_classes, seed, read_caption_file(captions))

    def _loader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        batches = ConditionBatches(self.dataset, self.hparams.batch_size)
        return DataLoader(batches, batch_size=None, sampler=RankBatches(batches, world, rank), num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def batch_condition(adapter, batch: dict, device=None):
    """The model condition of a batch of ConditionDataset items: class labels (DiT) or captions (PixArt)."""
    from tca_lightning.models.adapters import Condition

    if adapter.kind == "dit":
        labels = torch.as_tensor(batch["label"], device=device)
        if len(labels) and int(labels.max()) >= adapter.num_classes:
            raise ValueError(f"class label {int(labels.max())} is out of range for a DiT with {adapter.num_classes} "
                             f"classes: set data.init_args.num_classes <= {adapter.num_classes}")
        return Condition(labels=labels)
    return adapter.encode_captions(list(batch["caption"])).to(device)


def read_caption_file(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from tca_lightning.models.text_encoders import read_captions

    return read_captions(path)


def condition_batch(num_samples: int, num_classes: int = 10, seed: int = 0, offset: int = 0,
                    captions: Sequence[str] | None = None) -> dict:
    """Items ``offset .. offset + num_samples - 1`` of a ConditionDataset, collated into one batch."""
    ds = ConditionDataset(offset + num_samples, num_classes, seed, captions)
    items = [ds[i] for i in range(offset, offset + num_samples)]
    return {"index": torch.tensor([it["index"] for it in items]), "label": torch.tensor([it["label"] for it in items]),
            "caption": [it["caption"] for it in items]}

"""The conditions to sample for evaluation: which class / caption sample ``i`` asks for.

Sample ``i`` always asks for the same thing (class ``i mod num_classes``; for caption models a
caption naming that class, with style words drawn from ``i``), and its noise is seeded by
``i`` in the sampler, so a run's sample set is the same for any batch size or device count.
Under DDP, Lightning's distributed sampler gives each rank its own indices.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tca_lightning.models.captions import SLANT_WORDS, THICKNESS_WORDS, make_caption


class ConditionDataset(Dataset):
    def __init__(self, num_samples: int, num_classes: int, seed: int):
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        thickness, slant, keep_t, keep_s = torch.randint(0, 6, (4,), generator=g).tolist()
        caption = make_caption(label % 10, thickness % len(THICKNESS_WORDS) if keep_t % 2 else None,
                               slant % len(SLANT_WORDS) if keep_s % 2 else None)
        return {"index": index, "label": label, "caption": caption}


class SamplingDataModule(L.LightningDataModule):
    """Streams sample indices with their requested class and caption to ``test``/``predict``."""

    def __init__(self, num_samples: int = 1000, batch_size: int = 100, num_classes: int = 10, seed: int = 0):
        """
        Args:
            num_samples: how many images to generate and score.
            batch_size: images per sampler call (per device); memory, not results, depends on it.
            num_classes: class labels cycle over ``range(num_classes)``.
            seed: selects the style words of captions; the noise seed lives in the sampler config.
        """
        super().__init__()
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
        self.save_hyperparameters()
        self.dataset = ConditionDataset(num_samples, num_classes, seed)

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def batch_condition(adapter, batch: dict, device=None):
    """The model condition of a batch of ConditionDataset items: class labels (DiT) or captions (PixArt)."""
    from tca_lightning.models.adapters import Condition

    if adapter.kind == "dit":
        return Condition(labels=torch.as_tensor(batch["label"], device=device))
    return adapter.encode_captions(list(batch["caption"])).to(device)


def condition_batch(num_samples: int, num_classes: int = 10, seed: int = 0, offset: int = 0) -> dict:
    """Items ``offset .. offset + num_samples - 1`` of a ConditionDataset, collated into one batch."""
    ds = ConditionDataset(offset + num_samples, num_classes, seed)
    items = [ds[i] for i in range(offset, offset + num_samples)]
    return {"index": torch.tensor([it["index"] for it in items]), "label": torch.tensor([it["label"] for it in items]),
            "caption": [it["caption"] for it in items]}

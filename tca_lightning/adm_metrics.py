"""ADM's evaluation suite on Inception-v3 features, accumulated over batches and devices.

DiT-XL/2 (Peebles & Xie 2023) and the DiT PTQ papers (PTQ4DiT, Q-DiT) report FID, sFID, Inception
Score, precision and recall, as ADM's evaluator computes them (Dhariwal & Nichol 2021). One
Inception pass per image feeds all five: pooled 2048-d features (FID, precision/recall), the
spatial ``mixed_6/conv`` features (sFID), and the unbiased logits ``pool @ fc.weight^T`` (IS, as
torch-fidelity computes them). Feature lists are torchmetrics states reduced by concatenation, so
under DDP every rank's samples count once (``SamplingDataModule`` deals whole batches to ranks).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from tca_lightning.reference_sets import (feature_statistics, frechet_distance, inception_feature_extractor,
                                          inception_features, precision_recall)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` equal parts (Salimans et al. 2016): mean and std."""
    if len(logits) < splits:
        raise ValueError(f"Inception Score over {splits} splits needs >= {splits} samples, got {len(logits)}")
    probs = logits.double().softmax(dim=1)
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


class InceptionMetrics(Metric):
    """FID, sFID, IS, precision and recall of generated vs real images (ADM's suite).

    ``extractor``: torch-fidelity's InceptionV3 (``inception_feature_extractor()``, the default);
    tests pass a small module with the same ``Mixed_6d.branch1x1`` and ``fc`` layers."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, extractor: torch.nn.Module | None = None, splits: int = 10, k: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.extractor = (extractor if extractor is not None else inception_feature_extractor()).eval()
        self.extractor.requires_grad_(False)
        self.splits, self.k = splits, k
        for side in ("real", "fake"):
            for kind in ("pool", "spatial"):
                self.add_state(f"{side}_{kind}", default=[], dist_reduce_fx="cat")

    def update(self, images01: torch.Tensor, real: bool) -> None:
        """``images01``: (N, 3, H, W) in [0, 1] (or uint8), any size: the extractor resizes to 299."""
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise ValueError(f"Inception metrics take RGB images (N, 3, H, W), got {tuple(images01.shape)}")
        pooled, spatial = inception_features(self.extractor, images01)
        side = "real" if real else "fake"
        getattr(self, f"{side}_pool").append(pooled.float())
        getattr(self, f"{side}_spatial").append(spatial.float())

    @staticmethod
    def _cat(state) -> torch.Tensor:
        return torch.cat(state) if isinstance(state, list) else state

    def compute(self) -> dict:
        real_pool, fake_pool = self._cat(self.real_pool), self._cat(self.fake_pool)
        real_spatial, fake_spatial = self._cat(self.real_spatial), self._cat(self.fake_spatial)
        if len(real_pool) < 2 or len(fake_pool) < 2:
            raise ValueError(f"FID needs >= 2 real and >= 2 generated images, got {len(real_pool)} and {len(fake_pool)}")
        logits = fake_pool.double() @ self.extractor.fc.weight.double().T.to(fake_pool.device)
        is_mean, is_std = inception_score(logits, min(self.splits, len(fake_pool)))
        out = {"fid": frechet_distance(*feature_statistics(real_pool), *feature_statistics(fake_pool)),
               "sfid": frechet_distance(*feature_statistics(real_spatial), *feature_statistics(fake_spatial)),
               "is": is_mean, "is_std": is_std}
        if min(len(real_pool), len(fake_pool)) > self.k:
            out.update(precision_recall(real_pool, fake_pool, k=self.k))
        return out

"""ADM's suite (FID, sFID, IS, precision/recall) through InceptionMetrics, with a small stand-in for
torch-fidelity's InceptionV3 that has the layers the metrics read (Mixed_6d.branch1x1, fc)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tca_lightning.adm_metrics import InceptionMetrics, inception_score
from tca_lightning.evaluate import DiffusionEvaluator, ImageMetrics


class StandInInception(nn.Module):
    """uint8 (N, 3, H, W) -> 17x17 map through Mixed_6d.branch1x1 -> pooled (N, 8); fc: 10 classes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8, "the extractor is fed uint8 like torch-fidelity's"
        x = F.interpolate(images.float() / 255, size=(17, 17), mode="bilinear", align_corners=False)
        return self.Mixed_6d.branch1x1(x).relu().mean((2, 3))


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 12, 12, generator=g) * 0.6 + 0.2 + shift).clamp(0, 1)


def test_inception_score_bounds():
    assert inception_score(torch.zeros(40, 10), splits=4) == pytest.approx((1.0, 0.0))
    confident = torch.full((40, 10), -30.0)
    confident[torch.arange(40), torch.arange(40) % 10] = 30.0  # each image sure of its class, classes even
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    with pytest.raises(ValueError, match="needs >= 10 samples"):
        inception_score(torch.zeros(5, 10))


def test_same_images_score_perfectly_and_a_shift_is_seen():
    metric = InceptionMetrics(StandInInception(), splits=2)
    real = images(24, 0)
    metric.update(real, real=True)
    metric.update(real, real=False)
    same = metric.compute()
    assert abs(same["fid"]) < 1e-6  # 8-d features: full-rank covariance
    assert abs(same["sfid"]) < 1e-3  # 2023-d from 24 images: a rank-deficient covariance, eigh round-off
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["is"] >= 1.0
    metric.reset()
    metric.update(real, real=True)
    metric.update(images(24, 1, shift=0.3), real=False)
    shifted = metric.compute()
    assert shifted["fid"] > 1e-3 and shifted["sfid"] > 1e-3 and shifted["precision"] < 1.0


def test_batches_accumulate_like_one_update():
    real, fake = images(20, 0), images(20, 1, shift=0.1)
    whole = InceptionMetrics(StandInInception(), splits=2)
    whole.update(real, real=True)
    whole.update(fake, real=False)
    parts = InceptionMetrics(StandInInception(), splits=2)
    for chunk in real.split(7):
        parts.update(chunk, real=True)
    for chunk in fake.split(3):
        parts.update(chunk, real=False)
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys() == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), key


def test_image_metrics_with_inception_adds_paired_scores():
    metrics = ImageMetrics(None, inception=InceptionMetrics(StandInInception(), splits=2))
    metrics.reset()
    metrics.update_real(images(16, 0))
    fake = images(16, 1)
    metrics.update(fake, torch.zeros(16, dtype=torch.long), (fake + 0.05).clamp(0, 1))
    out = metrics.compute()
    assert {"fid", "sfid", "is", "precision", "recall", "psnr_vs_fp", "mse_vs_fp"} <= set(out)
    assert "cond_acc" not in out and metrics.num_real == metrics.num_fake == 16
    with pytest.raises(ValueError, match="RGB images"):
        metrics.update(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_real_image_source_is_checked_before_sampling(tmp_path):
    with pytest.raises(FileNotFoundError, match="guided-diffusion"):
        DiffusionEvaluator.image_metrics(str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"), None, 100)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            DiffusionEvaluator.image_metrics(str(tmp_path / "ref.npz"), None, 100)

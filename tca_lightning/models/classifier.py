"""mnist-features: a small CNN digit classifier whose penultimate layer feeds FID/KID.

It plays the role InceptionV3 plays for ImageNet models: FID/KID on its 128-d features,
IS on its class probabilities, and conditional accuracy from its predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class MnistFeatures(nn.Module):
    """Input (N, 1, 32, 32) in [-1, 1]; ``forward`` gives features, ``logits`` class scores."""

    def __init__(self, width: int = 32, num_features: int = 128, num_classes: int = 10):
        super().__init__()
        self.width, self.num_classes = width, num_classes
        self.num_features = num_features  # torchmetrics reads this instead of probing
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        config = {"width": self.width, "num_features": self.num_features, "num_classes": self.num_classes}
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MnistFeatures":
        path = Path(path)
        model = cls(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval()


class ClassifierLogits(nn.Module):
    """View of a classifier that returns logits: torchmetrics' InceptionScore softmaxes them."""

    def __init__(self, classifier: MnistFeatures):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(images)

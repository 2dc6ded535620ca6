"""A tiny frozen caption encoder for tiny-pixart, standing in for PixArt-alpha's T5.

Captions are short phrases over a fixed vocabulary ("a thick slanted handwritten seven").
Each word maps to a frozen random embedding (seeded, saved with the model), so the
transformer sees a token sequence through cross-attention exactly as PixArt sees T5 output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", "regular", "thick")
SLANT_WORDS = ("left-leaning", "upright", "right-leaning")
SPECIAL = ("<pad>", "<eos>")
VOCAB = SPECIAL + ("a", "handwritten", "digit") + THICKNESS_WORDS + SLANT_WORDS + DIGIT_WORDS


def digit_of_caption(caption: str) -> int:
    """The requested digit in a caption (the conditional-accuracy target)."""
    words = [w for w in caption.lower().split() if w in DIGIT_WORDS]
    if len(words) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one digit word of {DIGIT_WORDS}")
    return DIGIT_WORDS.index(words[0])


def make_caption(digit: int, thickness: int | None = None, slant: int | None = None) -> str:
    """Caption for a digit; thickness/slant are indices into the style words (None omits them)."""
    words = ["a"]
    if thickness is not None:
        words.append(THICKNESS_WORDS[thickness])
    if slant is not None:
        words.append(SLANT_WORDS[slant])
    words += ["handwritten", DIGIT_WORDS[digit]]
    return " ".join(words)


class TinyCaptionEncoder(torch.nn.Module):
    """Frozen word embeddings + an end token, padded to ``max_length``, with an attention mask."""

    def __init__(self, embed_dim: int = 64, max_length: int = 8, seed: int = 0):
        super().__init__()
        self.embed_dim, self.max_length, self.seed = embed_dim, max_length, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(len(VOCAB), embed_dim, generator=gen))

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = caption.lower().split()
            unknown = [w for w in words if w not in VOCAB or w in SPECIAL]
            if unknown:
                raise ValueError(f"caption {caption!r} has words {unknown} outside the tiny vocabulary {VOCAB[2:]}")
            tokens = [VOCAB.index(w) for w in words] + [VOCAB.index("<eos>")]
            if len(tokens) > self.max_length:
                raise ValueError(f"caption {caption!r} is longer than max_length={self.max_length - 1} words")
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
        return ids, mask

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, L, D), attention mask (B, L)); the empty caption "" is the null condition."""
        ids, mask = self.tokenize(captions)
        return self.table[ids.to(self.table.device)], mask.to(self.table.device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"table": self.table.contiguous()}, str(path / "model.safetensors"))
        config = {"embed_dim": self.embed_dim, "max_length": self.max_length, "seed": self.seed, "vocab": list(VOCAB)}
        (path / "config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TinyCaptionEncoder":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if tuple(config.pop("vocab")) != VOCAB:
            raise ValueError(f"{path} was saved with another vocabulary than this version's; retrain tiny-pixart")
        encoder = cls(**config)
        encoder.table.copy_(load_file(str(path / "model.safetensors"))["table"])
        return encoder

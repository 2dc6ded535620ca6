"""One interface between quantization methods and diffusers' DiT / PixArt transformers.

Methods never touch diffusers attribute names: they ask an adapter for the blocks, for every
quantizable linear with its role, for a conditioned forward, and for captured block inputs
and outputs that one block can replay alone. Adding an architecture means adding an adapter
and registering it; nothing else changes.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROLES = ("qkv", "attn_out", "fc1", "fc2", "adaln", "cross_q", "cross_kv", "cross_out", "embedders", "final")


@dataclass(frozen=True)
class LinearRef:
    """A quantizable linear: its qualified name, role (one of :data:`ROLES`) and block index (None outside blocks)."""

    name: str
    role: str
    block: int | None
    module: nn.Linear


@dataclass
class Condition:
    """What a forward needs besides x_t and t: class labels (DiT) or caption tokens and mask (PixArt)."""

    labels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.labels is None and self.tokens is None:
            raise ValueError("an empty Condition: give labels (DiT) or tokens and mask (PixArt)")
        return len(self.labels if self.labels is not None else self.tokens)

    def cat(self, other: "Condition") -> "Condition":
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Condition(join(self.labels, other.labels), join(self.tokens, other.tokens), join(self.mask, other.mask))

    def to(self, device) -> "Condition":
        move = lambda a: None if a is None else a.to(device)  # noqa: E731
        return Condition(move(self.labels), move(self.tokens), move(self.mask))


@dataclass
class BlockIO:
    """One block's call as captured: positional and keyword inputs, and its output."""

    args: tuple
    kwargs: dict[str, Any]
    output: torch.Tensor


class DiffusionAdapter(ABC):
    """Uniform access to a diffusers transformer; see the module docstring."""

    kind: str
    _roles: tuple[tuple[str, str], ...]  # (regex on the qualified name, role), first match wins

    def __init__(self, transformer: nn.Module, caption_encoder: nn.Module | None = None):
        self.transformer = transformer
        self.caption_encoder = caption_encoder

    # --- structure -------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def linears(self, roles: tuple[str, ...] | None = None) -> list[LinearRef]:
        """Every nn.Linear in the transformer with its role; an unknown linear is an error, not a silent skip."""
        refs = []
        for name, module in self.transformer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            role = next((r for pattern, r in self._roles if re.fullmatch(pattern, name)), None)
            if role is None:
                raise ValueError(f"{type(self).__name__} does not know the role of linear {name!r}; "
                                 "extend its _roles table")
            match = re.match(r"transformer_blocks\.(\d+)\.", name)
            if roles is None or role in roles:
                refs.append(LinearRef(name, role, int(match.group(1)) if match else None, module))
        return refs

    def shared_input_groups(self, names: list[str] | None = None) -> list[list[str]]:
        """Linears that read the same tensor (q/k/v of an attention; k/v of a cross-attention): a transform of
        that tensor must be one transform for the whole group, so it can fold into the op that produces it."""
        groups: dict[str, list[str]] = {}
        for ref in self.linears():
            if names is not None and ref.name not in names:
                continue
            key = ref.name
            if ref.role in ("qkv", "cross_kv"):
                key = ref.name.rsplit(".", 1)[0] + f".<{ref.role}>"
            groups.setdefault(key, []).append(ref.name)
        return list(groups.values())

    @property
    def config(self):
        return self.transformer.config

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def learned_sigma(self) -> bool:
        return self.config.out_channels == 2 * self.config.in_channels

    # --- conditioning and forward ----------------------------------------------------------
    @abstractmethod
    def null_condition(self, batch_size: int) -> Condition:
        """The unconditional input for classifier-free guidance."""

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The transformer's raw output (B, out_channels, H, W)."""

    # --- capture and replay ----------------------------------------------------------------
    @torch.no_grad()
    def capture(self, x: torch.Tensor, t: torch.Tensor, cond: Condition,
                blocks: list[int] | None = None) -> tuple[torch.Tensor, dict[int, BlockIO]]:
        """Run one forward and return (output, {block index: its inputs and output}) via hooks."""
        wanted = range(len(self.blocks())) if blocks is None else blocks
        captured: dict[int, BlockIO] = {}
        handles = []
        for i in wanted:
            block = self.blocks()[i]

            def pre(module, args, kwargs, i=i):
                captured[i] = BlockIO(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}, None)

            def post(module, args, kwargs, output, i=i):
                captured[i].output = output.detach()

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        try:
            out = self.forward(x, t, cond)
        finally:
            for h in handles:
                h.remove()
        return out, captured

    def run_block(self, index: int, io: BlockIO, block: nn.Module | None = None) -> torch.Tensor:
        """Replay block ``index`` (or a stand-in ``block``, e.g. its quantized copy) on captured inputs."""
        return (self.blocks()[index] if block is None else block)(*io.args, **io.kwargs)


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


# Self-attention and MLP of a diffusers BasicTransformerBlock, the same in DiT and PixArt.
_SELF_ATTN_MLP_ROLES = (
    (r"transformer_blocks\.\d+\.attn1\.to_[qkv]", "qkv"),
    (r"transformer_blocks\.\d+\.attn1\.to_out\.0", "attn_out"),
    (r"transformer_blocks\.\d+\.ff\.net\.0\.proj", "fc1"),
    (r"transformer_blocks\.\d+\.ff\.net\.2", "fc2"),
)


class DiTAdapter(DiffusionAdapter):
    """diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023): adaLN-Zero, class labels."""

    kind = "dit"
    _roles = _SELF_ATTN_MLP_ROLES + (
        (r"transformer_blocks\.\d+\.norm1\.linear", "adaln"),
        (r"transformer_blocks\.\d+\.norm1\.emb\..*", "embedders"),
        (r"proj_out_[12]", "final"),
    )

    @property
    def num_classes(self) -> int:
        return self.config.num_embeds_ada_norm

    def null_condition(self, batch_size: int) -> Condition:
        device = next(self.transformer.parameters()).device
        return Condition(labels=torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))

    def forward(self, x, t, cond):
        if cond.labels is None:
            raise ValueError("a DiT is conditioned on class labels: Condition.labels is missing")
        return self.transformer(x, timestep=_batch_timesteps(t, x), class_labels=cond.labels).sample


class PixArtAdapter(DiffusionAdapter):
    """diffusers ``PixArtTransformer2DModel`` (Chen et al. 2023, PixArt-alpha): adaLN-single, cross-attention."""

    kind = "pixart"
    _roles = _SELF_ATTN_MLP_ROLES + (
        (r"transformer_blocks\.\d+\.attn2\.to_q", "cross_q"),
        (r"transformer_blocks\.\d+\.attn2\.to_[kv]", "cross_kv"),
        (r"transformer_blocks\.\d+\.attn2\.to_out\.0", "cross_out"),
        (r"adaln_single\.linear", "adaln"),
        (r"adaln_single\.emb\..*", "embedders"),
        (r"caption_projection\..*", "embedders"),
        (r"proj_out", "final"),
    )

    def encode_captions(self, captions: list[str]) -> Condition:
        if self.caption_encoder is None:
            raise ValueError("this PixArt model has no caption encoder: pass precomputed caption embeddings "
                             "as Condition(tokens=..., mask=...)")
        tokens, mask = self.caption_encoder(list(captions))
        return Condition(tokens=tokens, mask=mask)

    def null_condition(self, batch_size: int) -> Condition:
        null = self.encode_captions([""])
        return Condition(tokens=null.tokens.expand(batch_size, -1, -1), mask=null.mask.expand(batch_size, -1))

    def forward(self, x, t, cond):
        if cond.tokens is None:
            raise ValueError("PixArt is conditioned on caption tokens: Condition.tokens is missing")
        return self.transformer(x, encoder_hidden_states=cond.tokens.to(x.dtype), encoder_attention_mask=cond.mask,
                                timestep=_batch_timesteps(t, x),
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _batch_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t


_REGISTRY: dict[str, type[DiffusionAdapter]] = {
    "DiTTransformer2DModel": DiTAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
}


def register_adapter(class_name: str, adapter: type[DiffusionAdapter]) -> None:
    _REGISTRY[class_name] = adapter


def get_adapter(transformer: nn.Module, caption_encoder: nn.Module | None = None) -> DiffusionAdapter:
    """The adapter for a transformer, looked up by its class name (the registry, not if-chains)."""
    name = type(transformer).__name__
    if name not in _REGISTRY:
        raise TypeError(f"no adapter for {name}; supported: {sorted(_REGISTRY)} (register one with register_adapter)")
    return _REGISTRY[name](transformer, caption_encoder)

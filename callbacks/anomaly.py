"""Anomaly heatmaps: per-layer input-channel magnitude over timesteps (the phenomenon TCA-DiT targets).

Each panel is one linear's input: rows are sampler steps (noisy -> clean), columns input
channels sorted by their overall magnitude, colour log10 of the per-timestep absmax. Channels
whose colour changes down a column are the timestep-dependent anomalies that one static
scale cannot fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROLES = ("qkv", "attn_out", "fc1", "fc2", "cross_q", "cross_kv", "cross_out")


def pick_layers(names_roles: list[tuple[str, str]], roles=DEFAULT_ROLES, blocks=(0, -1)) -> list[str]:
    """One linear per role (first of q/k/v) in the first and last block."""
    by_block: dict[int, list[tuple[str, str]]] = {}
    for name, role in names_roles:
        if role in roles and name.startswith("transformer_blocks."):
            by_block.setdefault(int(name.split(".")[1]), []).append((name, role))
    if not by_block:
        return []
    indices = sorted(by_block)
    chosen = []
    for b in {indices[i] for i in blocks}:
        seen = set()
        for name, role in by_block[b]:
            if role not in seen:
                seen.add(role)
                chosen.append(name)
    return sorted(chosen, key=lambda n: (int(n.split(".")[1]), n))


def anomaly_figure(absmax: dict[str, torch.Tensor], timesteps: torch.Tensor, names: list[str], title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        a = absmax[name].float().clamp_min(1e-6)
        order = a.amax(0).argsort(descending=True)
        im = ax.imshow(a[:, order].log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(name.replace("transformer_blocks.", "blk").replace(".", " ", 1), fontsize=8)
        ax.set_xlabel("input channel (sorted)", fontsize=7)
        ax.set_ylabel("step (t=%d..%d)" % (int(timesteps[0]), int(timesteps[-1])), fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or "log10 per-timestep input absmax", fontsize=9)
    fig.tight_layout()
    return fig


def write_anomaly_heatmaps(absmax: dict[str, torch.Tensor], timesteps: torch.Tensor, names: list[str],
                           path: str | os.PathLike, title: str = "", logger=None, tag: str = "anomaly/heatmaps"):
    """Save the figure as PNG (atomically) and, given a TensorBoard logger, log it as a figure."""
    if not names:
        return None
    return write_figure(anomaly_figure(absmax, timesteps, names, title), path, logger, tag)


def atg_cluster_figure(signatures: torch.Tensor, assignment: torch.Tensor, representatives: torch.Tensor,
                       timesteps: torch.Tensor | None = None):
    """ATG at a glance: signatures projected on their first two principal components, coloured by
    group (representatives ringed), and the group of every sampler step along the trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centered = signatures.float() - signatures.float().mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(centered, q=min(2, *centered.shape), center=False)
    xy = (centered @ v[:, :2]).numpy()
    if xy.shape[1] == 1:
        xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(6, 5), gridspec_kw={"height_ratios": [4, 1]})
    groups = assignment.numpy()
    ax.scatter(xy[:, 0], xy[:, 1], c=groups, cmap="tab10", s=18)
    reps = representatives.numpy()
    ax.scatter(xy[reps, 0], xy[reps, 1], facecolors="none", edgecolors="black", s=120, linewidths=1.5,
               label="representative")
    ax.set_xlabel("PC 1 of the anomaly signature", fontsize=8)
    ax.set_ylabel("PC 2", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"ATG: {len(signatures)} timesteps in {len(reps)} groups", fontsize=9)
    strip.imshow(groups[None], aspect="auto", cmap="tab10", interpolation="nearest")
    strip.set_yticks([])
    strip.set_xlabel("sampler step" + ("" if timesteps is None else f" (t = {int(timesteps[0])} .. {int(timesteps[-1])})"),
                     fontsize=8)
    fig.tight_layout()
    return fig


def write_figure(fig, path: str | os.PathLike, logger=None, tag: str = "figure"):
    """Save a matplotlib figure as PNG atomically and, given a TensorBoard logger, log it too."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_figure"):
        experiment.add_figure(tag, fig)
    plt.close(fig)
    return path


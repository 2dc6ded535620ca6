"""ATG: Anomaly-guided Timestep Grouping (TCA-DiT), with faiss k-means.

A timestep's anomaly signature is the per-channel magnitude profile of every quantized linear
input at that timestep: log-scaled, normalized per layer, concatenated over layers. Timesteps
whose anomaly channels look alike fall into one group; each group is represented by the member
nearest its centroid and weighted by its share of the timesteps. Calibrating on the K
representatives then costs ~K/T of calibrating on all T timesteps.

faiss-cpu is the default; the same ``faiss.Kmeans`` call uses the GPU when faiss-gpu reports one
(``gpu=`` flag), one code path for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SELECTIONS = ("atg", "uniform", "all")


def anomaly_signatures(absmax: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    """(T, D) signatures from per-layer (T, C) absmax profiles: log10, then zero-mean unit-norm per layer
    and timestep (so the *shape* of the profile counts, not the overall scale), concatenated, unit-normed."""
    names = sorted(absmax) if names is None else names
    if not names:
        raise ValueError("anomaly_signatures needs at least one layer's absmax profile")
    parts = []
    for name in names:
        p = absmax[name].float().clamp_min(1e-8).log10()
        p = p - p.mean(1, keepdim=True)
        parts.append(p / p.norm(dim=1, keepdim=True).clamp_min(1e-8))
    sig = torch.cat(parts, dim=1)
    return sig / sig.norm(dim=1, keepdim=True).clamp_min(1e-8)


@dataclass(frozen=True)
class TimestepGroups:
    """K groups over T sampler steps: per step its group, per group its representative step and weight."""

    assignment: torch.Tensor  # (T,) group id of each step
    representatives: torch.Tensor  # (K,) step index nearest each centroid
    weights: torch.Tensor  # (K,) group size / T (sums to 1)

    @property
    def k(self) -> int:
        return len(self.representatives)


def kmeans(x: torch.Tensor, k: int, niter: int = 50, seed: int = 0, nredo: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means: (centroids (K, D), assignment (N,))."""
    import faiss

    data = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    km = faiss.Kmeans(data.shape[1], k, niter=niter, seed=seed, nredo=nredo, verbose=False,
                      gpu=faiss.get_num_gpus() > 0, min_points_per_centroid=1)
    km.train(data)
    _, assignment = km.index.search(data, 1)
    return km.centroids, assignment[:, 0]


def group_timesteps(signatures: torch.Tensor, k: int, seed: int = 0) -> TimestepGroups:
    """Cluster T signatures into K groups (empty clusters are dropped, so K may shrink)."""
    t = signatures.shape[0]
    if not 1 <= k <= t:
        raise ValueError(f"ATG needs 1 <= K <= T, got K={k} for T={t} timesteps")
    centroids, assignment = kmeans(signatures, k, seed=seed)
    reps, weights, new_ids = [], [], {}
    for g in range(k):
        members = np.nonzero(assignment == g)[0]
        if len(members) == 0:
            continue
        dist = ((signatures[members].numpy() - centroids[g]) ** 2).sum(1)
        new_ids[g] = len(reps)
        reps.append(int(members[dist.argmin()]))
        weights.append(len(members) / t)
    order = np.argsort(reps)  # representatives in sampler order
    remap = {old: int(np.nonzero(order == new)[0][0]) for old, new in new_ids.items()}
    return TimestepGroups(torch.tensor([remap[int(a)] for a in assignment]), torch.tensor(reps)[order],
                          torch.tensor(weights, dtype=torch.float32)[order])


def select_timesteps(mode: str, num_steps: int, k: int, signatures: torch.Tensor | None = None,
                     seed: int = 0) -> TimestepGroups:
    """The calibration timesteps of an ablation mode: ``atg`` (clustered), ``uniform`` (K evenly spaced,
    equal weights) or ``all`` (every step, equal weights)."""
    if mode not in SELECTIONS:
        raise ValueError(f"timestep selection must be one of {SELECTIONS}, got {mode!r}")
    if mode == "atg":
        if signatures is None:
            raise ValueError("ATG selection needs anomaly signatures (from calibration statistics)")
        return group_timesteps(signatures, k, seed)
    if mode == "all":
        k = num_steps
    if not 1 <= k <= num_steps:
        raise ValueError(f"need 1 <= K <= T, got K={k} for T={num_steps}")
    reps = torch.linspace(0, num_steps - 1, k).round().long().unique()
    assignment = (torch.arange(num_steps)[:, None] - reps[None]).abs().argmin(1)
    return TimestepGroups(assignment, reps, torch.full((len(reps),), 1.0 / len(reps)))

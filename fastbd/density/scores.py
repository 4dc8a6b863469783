"""Local-density outlier scores from each point's k nearest neighbours (Huang et al., ICLR 2025,
score CLIP pairs this way: a poisoned pair's embedding lies in a sparser neighbourhood than its
neighbours do).

For unit rows ``x`` the distance is Euclidean, ``d = √(2 − 2·cos)``, so the neighbours are the
top-k by cosine — found by ``fastbd.ops.cosine_topk``, which never materialises or sorts the
``N×N`` similarity. With ``d₁ ≤ … ≤ d_k`` the distances to a point's k nearest neighbours
(itself excluded; distances below ``MIN_DISTANCE`` are raised to it, so duplicates stay finite):

* **k-distance** ``kd(x) = d_k``;
* **LID** (maximum-likelihood local intrinsic dimensionality, Amsaleg et al. 2015)
  ``LID(x) = −(1/k · Σᵢ ln(dᵢ / d_k))⁻¹`` (``inf`` where every ``dᵢ = d_k``);
* **SLOF** (simplified local outlier factor) ``mean_{o ∈ kNN(x)} kd(x) / kd(o)``;
* **DAO** (dimensionality-aware outlier factor, Anderberg et al. 2024)
  ``mean_{o ∈ kNN(x)} (kd(x) / kd(o))^{LID(o)}``, returned as its logarithm (the powers
  overflow float64 for high LIDs; the order is the same).

Higher scores are more outlying for all four.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_DISTANCE = 1e-6
"""Distances are at least this (unit vectors: about the float32 rounding of ``√(2 − 2·cos)``
at cos = 1), so duplicate points give finite ratios and logarithms."""
SCORES = ("k_distance", "lid", "slof", "dao")


@dataclass
class Neighbours:
    """Each point's k nearest other points: ``distances`` float64 ``N×k`` ascending and
    ``indices`` int64 ``N×k``."""

    distances: torch.Tensor
    indices: torch.Tensor


def nearest_neighbours(points: torch.Tensor, k: int, *, chunk: int = 4096,
                       backend: str | None = None) -> Neighbours:
    """The ``k`` nearest other rows of ``points`` (float ``N×D``, normalised here) for every
    row, by ``cosine_topk`` over ``chunk`` query rows at a time. A row's own entry is dropped
    (where an exact duplicate ranks first, the duplicate stays and the row itself goes)."""
    from fastbd.ops import cosine_topk

    n = points.shape[0]
    if n < 2:
        raise ValueError(f"neighbours need at least 2 points, got {n}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    unit = F.normalize(points.float(), dim=1)
    distances, indices = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=unit.device)
        cosines, found = cosine_topk(unit[rows], unit, k + 1, normalized=True, backend=backend,
                                     query_chunk=chunk)
        is_self = found == rows[:, None]
        # Drop the row itself; a row not among its own k+1 (duplicates) drops its last entry.
        drop = torch.where(is_self.any(1), is_self.int().argmax(1), torch.full_like(rows, k))
        keep = torch.ones_like(found, dtype=torch.bool)
        keep[torch.arange(rows.numel(), device=unit.device), drop] = False
        cosines = cosines[keep].view(-1, k).double()
        distances.append((2 - 2 * cosines).clamp_min(0).sqrt().clamp_min(MIN_DISTANCE).cpu())
        indices.append(found[keep].view(-1, k).cpu())
    return Neighbours(torch.cat(distances), torch.cat(indices))


def k_distance(neighbours: Neighbours) -> torch.Tensor:
    """float64 ``N``: the distance to the k-th nearest neighbour."""
    return neighbours.distances[:, -1]


def lid(neighbours: Neighbours) -> torch.Tensor:
    """float64 ``N``: the maximum-likelihood local intrinsic dimensionality."""
    d = neighbours.distances
    mean_log = torch.log(d / d[:, -1:]).mean(1)
    return torch.where(mean_log < 0, -1 / mean_log, torch.full_like(mean_log, math.inf))


def slof(neighbours: Neighbours) -> torch.Tensor:
    """float64 ``N``: mean ratio of the point's k-distance to its neighbours'."""
    kd = k_distance(neighbours)
    return (kd[:, None] / kd[neighbours.indices]).mean(1)


def dao(neighbours: Neighbours) -> torch.Tensor:
    """float64 ``N``: ``log DAO`` — the log of the mean of ``(kd(x)/kd(o))^{LID(o)}`` over the
    neighbours ``o`` (log-sum-exp; an infinite LID counts as the largest finite one)."""
    kd = k_distance(neighbours)
    dims = lid(neighbours)
    finite = dims[torch.isfinite(dims)]
    dims = torch.nan_to_num(dims, posinf=float(finite.max()) if finite.numel() else 1.0)
    exponents = dims[neighbours.indices] * torch.log(kd[:, None] / kd[neighbours.indices])
    return torch.logsumexp(exponents, dim=1) - math.log(neighbours.indices.shape[1])


def density_scores(neighbours: Neighbours, score: str) -> torch.Tensor:
    """The named score (one of ``SCORES``) of every point, float64 ``N``."""
    functions = {"k_distance": k_distance, "lid": lid, "slof": slof, "dao": dao}
    if score not in functions:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return functions[score](neighbours)

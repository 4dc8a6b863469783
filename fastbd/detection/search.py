"""The iterative cluster search shared by PoisonCAM and PatchSearch.

Each cluster's members are shuffled once. Every round scores ``samples_per_cluster`` new images
from each remaining cluster, updates the cluster scores (sum for PoisonCAM, max for
PatchSearch) and drops the lowest ``prune_fraction`` of the remaining clusters — at least one, so
the search always ends with no cluster left. Unscored images keep score 0. The state after each
round can be saved and resumed; every round's randomness derives from (seed, round), so a resumed
search equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastbd.storage import load_torch, save_atomically

log = logging.getLogger(__name__)

# score_batch(image indices int64 B, generator) -> (scores float B, windows int64 B×2)
ScoreFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SearchState:
    """Everything a resumed search needs. ``scores`` float64 ``N``, ``scored`` bool ``N``,
    ``windows`` int64 ``N×2`` (−1 for unscored), ``members`` per cluster (shuffled),
    ``remaining`` cluster ids, ``cluster_scores`` float64 ``K``, ``round``, ``rounds`` log,
    ``top_maps``: the attention maps of the best-scored images so far (row → (score, map)), and
    ``run``: what identifies the search (``Detector`` stores the method, the search's config and
    a fingerprint of the clustering, and refuses to resume another search's state);
    ``stage_seconds`` / ``stage_images``: time and images per stage over every run that worked
    on this search (``search``: the rounds' wall time, kept by ``run_search``)."""

    scores: torch.Tensor
    scored: torch.Tensor
    windows: torch.Tensor
    members: list[torch.Tensor]
    remaining: list[int]
    cluster_scores: torch.Tensor
    round: int = 0
    rounds: list[dict] = field(default_factory=list)
    top_maps: dict[int, tuple[float, torch.Tensor]] = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_images: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, labels: torch.Tensor, n_clusters: int, seed: int,
              run: dict | None = None) -> SearchState:
        labels = labels.cpu()
        g = torch.Generator().manual_seed(seed)
        members = []
        for c in range(n_clusters):
            rows = torch.nonzero(labels == c).flatten()
            members.append(rows[torch.randperm(rows.numel(), generator=g)])
        n = labels.numel()
        return cls(scores=torch.zeros(n, dtype=torch.float64),
                   scored=torch.zeros(n, dtype=torch.bool),
                   windows=torch.full((n, 2), -1, dtype=torch.long), members=members,
                   remaining=[c for c in range(n_clusters) if members[c].numel()],
                   cluster_scores=torch.zeros(n_clusters, dtype=torch.float64),
                   run=run or {})

    def save(self, path: str | Path) -> None:
        save_atomically(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> SearchState:
        """The state saved at ``path`` (tensors and containers only: ``load_torch``); a file
        that is not a saved search raises ``ValueError`` naming it."""
        saved = load_torch(path, "search state")
        names = {f.name for f in fields(cls)}
        if not isinstance(saved, dict) or not names >= saved.keys() or not {
                f.name for f in fields(cls) if f.default is MISSING
                and f.default_factory is MISSING} <= saved.keys():
            raise ValueError(f"{path} is not a saved fastbd search; remove it or choose another "
                             "output folder")
        return cls(**saved)


def drop_count(remaining: int, prune_fraction: float) -> int:
    """Clusters dropped after a round: ``floor(prune_fraction · remaining)``, at least one."""
    return min(remaining, max(1, math.floor(prune_fraction * remaining)))


def expected_scored(n_clusters: int, samples_per_cluster: int, prune_fraction: float,
                    n_images: int) -> int:
    """Images a search over ``n_clusters`` clusters scores when no cluster runs out of members:
    ``samples_per_cluster`` per remaining cluster per round, ``drop_count`` clusters dropped
    after each (at most ``n_images``)."""
    remaining, total = n_clusters, 0
    while remaining:
        total += remaining * samples_per_cluster
        remaining -= drop_count(remaining, prune_fraction)
    return min(total, n_images)


# prune(remaining cluster ids, cluster scores float64 K, prune_fraction, images scored this
# round) -> the clusters that stay, in the order the next round visits them
PruneFn = Callable[[list[int], torch.Tensor, float, int], list[int]]


def prune_lowest(remaining: list[int], cluster_scores: torch.Tensor, prune_fraction: float,
                 scored: int) -> list[int]:
    """fastbd's rule: drop the ``drop_count`` lowest-scoring clusters (ties: the lower id
    first), keep the rest in their order."""
    order = sorted(remaining, key=lambda c: (float(cluster_scores[c]), c))
    dropped = set(order[:drop_count(len(order), prune_fraction)])
    return [c for c in remaining if c not in dropped]


def prune_published(remaining: list[int], cluster_scores: torch.Tensor, prune_fraction: float,
                    scored: int) -> list[int]:
    """PatchSearch's official rule: a round that found no image to score ends the search; else
    the clusters are ordered by their integer scores with numpy's default (unstable) argsort,
    reversed, and the last ``int(prune_fraction · n)`` dropped — none left when that is 0, so
    the search stops once fewer than ``1 / prune_fraction`` clusters remain."""
    import numpy as np

    if scored == 0:
        return []
    table = np.array([(c, float(cluster_scores[c])) for c in remaining]).astype(int)
    table = table[table[:, 1].argsort()][::-1]
    drop = int(prune_fraction * len(remaining))
    return table[:-drop, 0].tolist() if drop else []


AGGREGATES = ("sum", "max", "max_all")
"""How a cluster's score combines its images' scores: the ``sum`` or the ``max`` of its scored
images, or ``max_all``, the max over all its members with the unscored ones at 0 (PatchSearch's
official code)."""


def run_search(state: SearchState, score_batch: ScoreFn, *, samples_per_cluster: int,
               prune_fraction: float, aggregate: str, seed: int,
               checkpoint: str | Path | None = None, verbose: bool = True,
               max_rounds: int | None = None, prune: PruneFn = prune_lowest) -> SearchState:
    """Run rounds until no cluster remains (or ``max_rounds`` more rounds have run); ``prune``
    chooses the clusters that stay after each round."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    bar = tqdm(desc="search", unit="round", disable=not verbose)
    done = 0
    while state.remaining and (max_rounds is None or done < max_rounds):
        started = time.perf_counter()
        batch = []
        for c in state.remaining:
            fresh = state.members[c][~state.scored[state.members[c]]]
            batch.append(fresh[:samples_per_cluster])
        picked = torch.cat(batch) if batch else torch.empty(0, dtype=torch.long)
        if picked.numel():
            g = torch.Generator().manual_seed(seed * 1_000_003 + state.round)
            scores, windows = score_batch(picked, g)
            state.scores[picked] = scores.double().cpu()
            state.windows[picked] = windows.long().cpu()
            state.scored[picked] = True
        for c in state.remaining:
            members = state.members[c]
            if aggregate == "max_all":
                if members.numel():
                    state.cluster_scores[c] = state.scores[members].max()
                continue
            values = state.scores[members[state.scored[members]]]
            if values.numel():
                state.cluster_scores[c] = values.sum() if aggregate == "sum" else values.max()
        before = len(state.remaining)
        state.remaining = prune(state.remaining, state.cluster_scores, prune_fraction,
                                int(picked.numel()))
        state.rounds.append({"round": state.round, "scored": int(picked.numel()),
                             "dropped": before - len(state.remaining),
                             "remaining": len(state.remaining)})
        state.round += 1
        done += 1
        state.stage_seconds["search"] = (state.stage_seconds.get("search", 0.0)
                                         + time.perf_counter() - started)
        if checkpoint is not None:
            state.save(checkpoint)
        bar.update()
        bar.set_postfix(remaining=len(state.remaining), scored=int(state.scored.sum()))
    bar.close()
    return state

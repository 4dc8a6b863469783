"""What a detector plugs into the shared pipeline (``Detector``): how it finds each image's
candidate trigger window, how the flip test scores a candidate, and how a cluster's score
combines its images' scores.

A new detector is a package with one ``DetectorMethod`` subclass and one registration
(``fastbd.registry.DETECTORS``); ``fastbd.poisoncam`` and ``fastbd.patchsearch`` are the two
examples (docs/contributing.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastbd.detection.clustering import ClusteringModel
from fastbd.detection.config import Config
from fastbd.detection.flip import select_test_images
from fastbd.detection.search import prune_lowest
from fastbd.models.encoders import Encoder

# encode_assign(normalised input B×3×S×S) -> (cluster ids int64 B, distances float B)
EncodeAssign = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SearchContext:
    """Everything a method sees while the search runs. ``encoder``: the float32 encoder (for
    gradients); ``encode_assign``: the inference encoder (``dtype``) followed by the clustering
    model; ``bank``: uint8 ``N×3×S×S`` images (a device tensor or ``HostRows``); ``labels``:
    int64 ``N`` cluster ids; ``config``: the config scaled to the data."""

    encoder: Encoder
    encode_assign: EncodeAssign
    clustering: ClusteringModel
    bank: torch.Tensor
    labels: torch.Tensor
    config: Config
    device: torch.device
    dtype: torch.dtype


class DetectorMethod:
    """A detector's choices. The three every detector makes: ``candidates``, ``flip_sources``
    and ``cluster_score`` (``sum`` or ``max`` of a cluster's scored images, or ``max_all``: the
    max over all its members, unscored ones at 0). The rest have fastbd's defaults, which a
    method reproducing another implementation overrides (``fastbd.patchsearch.published``):
    the clustering model, the test set, the paste corners, the pruning and the rankings.
    ``name`` tags the method's results and saved searches."""

    name: str = ""
    cluster_score: str = "sum"

    def fit_clustering(self, features: torch.Tensor, config: Config):
        """The clustering model of unit features ``N×D``, labels int64 ``N`` and distances
        float ``N`` to the assigned centroid (cosine k-means++)."""
        return ClusteringModel.fit(features, config.n_clusters, config.kmeans_iters,
                                   config.seed)

    def select_test_images(self, labels: torch.Tensor, distances: torch.Tensor, size: int,
                           generator: torch.Generator) -> torch.Tensor:
        """The flip test's images (int64 indices): ``size`` spread over the clusters."""
        return select_test_images(labels, distances, size, generator)

    def flip_corner_positions(self, size: int, window: int) -> int:
        """Paste corners per axis the flip test draws from: every in-image position."""
        return size - window + 1

    def prune(self, remaining: list[int], cluster_scores: torch.Tensor, prune_fraction: float,
              scored: int) -> list[int]:
        """The clusters that stay after a round (``fastbd.detection.search.prune_lowest``)."""
        return prune_lowest(remaining, cluster_scores, prune_fraction, scored)

    def rank(self, scores: torch.Tensor) -> torch.Tensor:
        """Image indices by decreasing score (ties: the lower index first); the top of it are
        the found triggers."""
        return torch.argsort(scores, descending=True, stable=True)

    def classifier_sets(self, scores: torch.Tensor, ranking: torch.Tensor, k: int,
                        config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The poison classifier's validation positives (the top ``k`` of ``ranking``) and
        negatives (its bottom ``topk_poisons``), and its training pool: every other image but
        the top ``drop_top_fraction`` (at least ``k``). All int64 indices."""
        n = ranking.numel()
        drop_top = max(k, round(config.drop_top_fraction * n))
        bottom = ranking[-config.topk_poisons:]
        pool_mask = torch.ones(n, dtype=torch.bool)
        pool_mask[ranking[:drop_top]] = False
        pool_mask[bottom] = False
        return ranking[:k], bottom, torch.nonzero(pool_mask).flatten()

    def candidates(self, context: SearchContext, rows: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate windows int64 ``B×2`` (top-left) and attention maps float ``B×S×S`` of the
        bank ``rows`` (int64 ``B``)."""
        raise NotImplementedError

    def encoder_passes(self, config: Config) -> int:
        """Encoder passes ``candidates`` makes per image (for the throughput figures)."""
        return 1

    def flip_sources(self, context: SearchContext, rows: torch.Tensor) -> torch.Tensor | None:
        """None: a flip is any change of a test image's cluster; else int64 ``B`` cluster ids:
        the flip score counts test images pulled into that cluster minus those already in it
        (``fastbd.detection.flip.flip_counts``)."""
        return None

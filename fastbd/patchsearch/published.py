"""PatchSearch as its authors' code runs it (UCDvision/PatchSearch), beside fastbd's corrected
variant (``PatchSearchMethod``). Each official behaviour, and where fastbd's variant differs:

* clustering: L2 k-means on the normalised features from random initial centres, centroids left
  unnormalised (faiss) — fastbd: cosine k-means++ with unit centroids;
* flip test: the pasted images' features assigned *unnormalised*, by L2 — fastbd normalises;
  the paste corner drawn from ``[0, S − w)``, never the last row or column — fastbd ``[0, S − w]``;
* test set: ``test_set_size // K`` closest members of every cluster, short where a cluster is
  small — fastbd spreads exactly ``test_set_size`` round-robin;
* a cluster's score: the max over all its members, the unscored ones counting 0 — fastbd: the
  max of its scored images;
* pruning: integer scores ordered by numpy's unstable argsort, ``int(0.25·n)`` dropped, so the
  search stops once fewer than four clusters remain — fastbd drops at least one (stable ties)
  and searches to the end;
* rankings: numpy's unstable sorts — ``argsort(scores)[::-1]`` for the exported patches and
  ``argsort(-scores)`` for the classifier's sets — fastbd sorts stably;
* the poison classifier (``ClassifierConfig(recipe="published")``, no pool cleaning, argmax):
  torchvision's 7×7 + max-pool stem at any size, half-open paste ranges, epochs over the pool,
  validation from the first update, members weighted by the epochs they started.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fastbd.detection import Config, Detector
from fastbd.detection.clustering import L2ClusteringModel
from fastbd.detection.flip import select_test_images_published
from fastbd.detection.search import prune_published
from fastbd.patchsearch.method import PatchSearchMethod


class PublishedPatchSearchMethod(PatchSearchMethod):
    name = "patchsearch-published"
    cluster_score = "max_all"

    def fit_clustering(self, features: torch.Tensor, config: Config):
        return L2ClusteringModel.fit(features, config.n_clusters, config.kmeans_iters,
                                     config.seed)

    def select_test_images(self, labels, distances, size, generator):
        return select_test_images_published(labels, distances, size, generator)

    def flip_corner_positions(self, size: int, window: int) -> int:
        return max(1, size - window)

    def prune(self, remaining, cluster_scores, prune_fraction, scored):
        return prune_published(remaining, cluster_scores, prune_fraction, scored)

    def rank(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(
            np.argsort(scores.cpu().double().numpy())[::-1])).long()

    def classifier_sets(self, scores, ranking, k, config):
        order = torch.from_numpy(np.argsort(-scores.cpu().double().numpy())).long()
        n = order.numel()
        start = int(config.drop_top_fraction * n)
        return (order[:config.topk_poisons], order[-config.topk_poisons:],
                order[start:n - config.topk_poisons].sort().values)


def published_config(config: Config | None = None) -> Config:
    """``config`` (default ``Config()``) with the official code's poison classifier: its
    training recipe, no pool cleaning, the argmax decision — and no backdoor check (the official
    code has none)."""
    config = config or Config()
    return replace(config, check=False, classifier=replace(config.classifier, recipe="published",
                                              pool_cleaning_rounds=0, threshold="argmax"))


class PublishedPatchSearch(Detector):
    """PatchSearch with every behaviour of the official code (module docstring), on
    ``published_config(config)``; ``fit`` as ``Detector.fit``."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(PublishedPatchSearchMethod(), published_config(config))

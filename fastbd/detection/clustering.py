"""The clustering model: k-means on L2-normalised features, assignment by cosine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastbd.ops import KMeans, kmeans_assign


@dataclass
class ClusteringModel:
    """``centroids``: unit float32 ``K×D``. ``assign`` returns cluster ids and the cosine
    distance ``1 − cos`` to the assigned centroid."""

    centroids: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, n_clusters: int, n_iter: int, seed: int
            ) -> tuple[ClusteringModel, torch.Tensor, torch.Tensor]:
        """k-means (cosine, k-means++) on ``N×D`` features; returns the model, labels ``N`` and
        distances ``N``."""
        model = KMeans(n_clusters, n_iter, metric="cosine", seed=seed).fit(features)
        return cls(model.cluster_centers_), model.labels_, model.distances_

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(features.float(), dim=1)
        return kmeans_assign(features, self.centroids.to(features.device), metric="cosine",
                             normalized=True)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every centroid, ``N×K`` (differentiable; Grad-CAM target)."""
        return F.normalize(features, dim=1) @ self.centroids.to(features.device).T

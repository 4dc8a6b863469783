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
        """k-means (cosine, k-means++) on ``N×D`` features, the assignments sharded over the
        ranks of a ``torch.distributed`` world; returns the model, labels ``N`` and distances
        ``N``."""
        model = KMeans(n_clusters, n_iter, metric="cosine", seed=seed, sharded=True).fit(features)
        return cls(model.cluster_centers_), model.labels_, model.distances_

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(features.float(), dim=1)
        return kmeans_assign(features, self.centroids.to(features.device), metric="cosine",
                             normalized=True)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every centroid, ``N×K`` (differentiable; Grad-CAM target)."""
        return F.normalize(features, dim=1) @ self.centroids.to(features.device).T


@dataclass
class L2ClusteringModel:
    """The clustering model of PatchSearch's official code: L2 k-means on the L2-normalised
    features (random initial centres drawn from the data, as faiss does), centroids left
    unnormalised, and ``assign`` by L2 distance to them of the features *as given* — the flip
    test passes the pasted images' raw, unnormalised features. ``logits`` (the Grad-CAM target)
    are cosines to the normalised mean feature of each cluster's members."""

    centroids: torch.Tensor
    member_means: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, n_clusters: int, n_iter: int, seed: int
            ) -> tuple[L2ClusteringModel, torch.Tensor, torch.Tensor]:
        """L2 k-means on unit ``N×D`` features; returns the model, labels ``N`` and squared L2
        distances ``N`` to the assigned centroid (faiss's ``index.search`` distances)."""
        g = torch.Generator().manual_seed(seed)
        start = features[torch.randperm(features.shape[0], generator=g)[:n_clusters]
                         .to(features.device)].float()
        model = KMeans(n_clusters, n_iter, metric="l2", init=start, sharded=True).fit(features)
        centroids = model.cluster_centers_.float()
        labels, distances = kmeans_assign(features.float(), centroids.to(features.device),
                                          metric="l2")
        sums = torch.zeros_like(centroids).index_add_(0, labels.to(centroids.device),
                                                      features.float().to(centroids.device))
        counts = torch.bincount(labels.cpu(), minlength=n_clusters).clamp(min=1)
        means = F.normalize(sums / counts[:, None].to(sums.device), dim=1)
        return cls(centroids, means), labels, distances

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kmeans_assign(features.float(), self.centroids.to(features.device), metric="l2")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ self.member_means.to(features.device).T

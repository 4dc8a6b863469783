"""k-means: ``KMeans`` (k-means++ init, Lloyd iterations, cosine or L2) and ``kmeans_assign``.

The assignment step — distance to every centroid and argmin — is the hot path. Backends:

* ``triton``: fused distance + argmin (``fastbd.kernels.kmeans``), never writing the N×K matrix;
  on CUDA its tile is chosen by Triton's autotuner once per (K, D, dtype) and cached on disk;
* ``torch``: the reference, ``x @ cᵀ`` in row chunks (memory O(chunk × K)) then ``min``;
* ``cuml`` (fit only, optional ``fastbd[rapids]``): cuML's KMeans; for cosine the features are
  normalised, clustered with L2 and the centroids renormalised (spherical k-means approximated).

Metrics: ``cosine`` clusters L2-normalised features around normalised centroids (spherical
k-means) with distance ``1 − cos``; ``l2`` uses squared Euclidean distance (sklearn's inertia).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from fastbd.distributed import gather_rows, shard
from fastbd.ops._backend import OpSpec, choose_backend, external_backend, register
from fastbd.ops._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor

log = logging.getLogger(__name__)

register(OpSpec("kmeans", ("triton", "cuml", "torch"), {"cuda": ("torch", "triton")},
                extensible=False))  # the estimator; register kmeans_assign backends instead
register(OpSpec("kmeans_assign", ("triton", "torch"), {"cuda": ("torch", "triton")}))
METRICS = ("cosine", "l2")


def _check_features(name: str, x: torch.Tensor, validate: bool = True) -> None:
    check_tensor(name, x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions")
    if validate:
        check_finite(name, x)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "cosine",
                  normalized: bool = False, chunk_size: int = 8192,
                  backend: str | None = None, validate: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row.

    Args:
        x: float ``N×D`` features.
        centroids: float ``K×D`` (same dtype as ``x``).
        metric: ``cosine`` or ``l2``.
        normalized: for cosine, whether ``x`` and ``centroids`` already have unit rows.
        chunk_size: rows per matmul in the torch path.
        validate: check both for NaN/Inf (a host sync each); False skips it on hot paths —
            non-finite inputs then give unspecified labels.

    Returns:
        labels int64 ``N`` and distances float32 ``N`` (cosine: ``1 − cos``; l2: squared).

    Example:
        >>> import torch
        >>> from fastbd.ops import kmeans_assign
        >>> centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> labels, distances = kmeans_assign(torch.tensor([[0.9, 0.1], [0.2, 3.0]]), centroids,
        ...                                   metric="l2")
        >>> labels.tolist(), distances
        ([0, 1], tensor([0.0200, 4.0400]))
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("centroids", centroids, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device(x=x, centroids=centroids)
    _check_features("x", x, validate)
    _check_features("centroids", centroids, validate)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has {x.shape[1]} dims, centroids have {centroids.shape[1]}")
    if centroids.shape[0] == 0:
        raise ValueError("centroids is empty")
    if x.dtype != centroids.dtype:
        raise TypeError(f"x is {x.dtype} but centroids are {centroids.dtype}")
    chosen = choose_backend("kmeans_assign", x.device, backend)
    external = external_backend("kmeans_assign", chosen)
    if external is not None:
        return external(x=x, centroids=centroids, metric=metric, normalized=normalized,
                        chunk_size=chunk_size)
    if metric == "cosine" and not normalized:
        x = F.normalize(x, dim=1)
        centroids = F.normalize(centroids, dim=1)
    return _assign(x, centroids, metric, chunk_size, chosen)


def _assign(x: torch.Tensor, centroids: torch.Tensor, metric: str, chunk_size: int,
            backend: str, x_sq: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked assignment on prepared inputs (unit rows for cosine); ``x_sq`` = ``||x||²``
    float32 ``N`` for l2 (computed when absent). Returns labels and distances as above."""
    device = x.device
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=device)
    scores = torch.empty(x.shape[0], dtype=torch.float32, device=device)
    if x.shape[0] == 0:
        return labels, scores
    centroid_sq = centroids.float().pow(2).sum(1)
    if backend == "triton":
        if device.type == "cpu" and x.dtype == torch.bfloat16:
            raise TypeError("the Triton interpreter has no bfloat16; use float32/float16 on CPU")
        from fastbd.kernels import kmeans as kernel

        config = kernel.INTERPRETER_CONFIG if device.type == "cpu" else None  # None: autotuned
        kernel.launch(x.contiguous(), centroids.contiguous(), centroid_sq, labels, scores,
                      metric == "l2", config)
    else:
        bias = centroid_sq.to(x.dtype)[None, :]
        for start in range(0, x.shape[0], chunk_size):
            block = x[start:start + chunk_size]
            if metric == "l2":
                best, idx = torch.addmm(bias, block, centroids.T, alpha=-2.0).min(dim=1)
            else:
                best, idx = (block @ centroids.T).max(dim=1)
                best = best.neg()
            scores[start:start + chunk_size] = best
            labels[start:start + chunk_size] = idx
    if metric == "l2":
        if x_sq is None:
            x_sq = x.float().pow(2).sum(1)
        return labels, scores.add_(x_sq).clamp_(min=0.0)
    return labels, scores.add_(1.0).clamp_(min=0.0)


class KMeans:
    """k-means with k-means++ init and Lloyd iterations on torch tensors (any device).

    Args:
        n_clusters: number of clusters K (1 ≤ K ≤ N).
        n_iter: Lloyd iterations (PatchSearch/faiss use 20).
        metric: ``cosine`` (spherical: unit features, unit centroids) or ``l2``.
        init: ``k-means++`` (greedy, ``2 + ln K`` local trials as in scikit-learn), ``random``
            (K distinct rows), or a ``K×D`` tensor of initial centroids.
        seed: seed of the init's random draws.
        tol: stop when the summed squared centroid shift is ≤ ``tol`` (0: run all iterations
            unless the labels stop changing).
        init_sample: run k-means++ on at most this many random rows (``None``: all rows).
        chunk_size: rows per matmul in the torch assignment.
        backend: ``triton``, ``torch`` or ``cuml``; default by device (see ``fastbd.ops``).
        sharded: in a ``torch.distributed`` world, each rank assigns its shard of whole
            ``chunk_size`` chunks and the labels and distances are gathered, so every rank runs
            the same Lloyd iterations as one process and ends with the same model (every rank
            must call ``fit``; the init and the centroid update run on every rank, on all rows).

    After ``fit``: ``cluster_centers_`` (float32 ``K×D``), ``labels_``, ``distances_`` (to the
    assigned centroid), ``inertia_`` (their sum), ``n_iter_``, ``init_centers_``, ``backend_``.

    Example:
        >>> import torch
        >>> from fastbd.ops import KMeans
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(50, 2, generator=g) * 0.1,
        ...                torch.randn(30, 2, generator=g) * 0.1 + 5])
        >>> model = KMeans(2, metric="l2", seed=0).fit(x)
        >>> sorted(torch.bincount(model.labels_).tolist())
        [30, 50]
        >>> model.predict(torch.tensor([[5.0, 5.0]])).item() == model.labels_[-1].item()
        True
    """

    def __init__(self, n_clusters: int, n_iter: int = 20, *, metric: str = "cosine",
                 init: str | torch.Tensor = "k-means++", seed: int = 0, tol: float = 0.0,
                 init_sample: int | None = None, chunk_size: int = 8192,
                 backend: str | None = None, sharded: bool = False) -> None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
            raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or a tensor, got {init!r}")
        self.n_clusters = n_clusters
        self.n_iter = n_iter
        self.metric = metric
        self.init = init
        self.seed = seed
        self.tol = tol
        self.init_sample = init_sample
        self.chunk_size = chunk_size
        self.backend = backend
        self.sharded = sharded

    # -- public API -----------------------------------------------------------------------
    def fit(self, x: torch.Tensor) -> KMeans:
        """Cluster float ``N×D`` features."""
        _check_features("x", x)
        n = x.shape[0]
        if n == 0:
            raise ValueError("cannot fit k-means on an empty feature matrix")
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the {n} samples")
        self.backend_ = choose_backend("kmeans", x.device, self.backend)
        data = self._prepare(x)
        if self.backend_ == "cuml":
            return self._fit_cuml(data)
        assign_backend = self.backend_
        generator = torch.Generator(device=data.device).manual_seed(self.seed)
        centers = self._initial_centers(data, generator)
        self.init_centers_ = centers.clone()
        x_sq = data.float().pow(2).sum(1) if self.metric == "l2" else None
        labels = None
        self.n_iter_ = 0
        for _ in range(self.n_iter):
            new_labels, distances = self._assign_all(data, centers, assign_backend, x_sq)
            self.n_iter_ += 1
            new_centers = self._update(data, new_labels, distances)
            shift = float((new_centers - centers).pow(2).sum())
            converged = labels is not None and torch.equal(labels, new_labels)
            centers, labels = new_centers, new_labels
            if converged or shift <= self.tol and self.tol > 0:
                break
        self.cluster_centers_ = centers
        self.labels_, self.distances_ = self._assign_all(data, centers, assign_backend, x_sq)
        self.inertia_ = float(self.distances_.double().sum())
        return self

    def fit_predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.fit(x).labels_

    def assign(self, x: torch.Tensor, backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (int64 ``N``) and distance to the assigned centroid (float32 ``N``)."""
        centers = self._fitted_centers(x)
        return kmeans_assign(self._prepare(x), centers.to(x.dtype), metric=self.metric,
                             normalized=True, chunk_size=self.chunk_size,
                             backend=backend or self._assign_backend())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.assign(x)[0]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Distances to every centroid, float32 ``N×K`` (cosine: ``1 − cos``; l2: Euclidean)."""
        centers = self._fitted_centers(x)
        data = self._prepare(x).float()
        if self.metric == "cosine":
            return 1.0 - data @ centers.T
        return torch.cdist(data, centers)

    # -- internals ------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        _check_features("x", x)
        return F.normalize(x, dim=1) if self.metric == "cosine" else x

    def _fitted_centers(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("KMeans is not fitted; call fit first")
        if x.ndim == 2 and x.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(f"x has {x.shape[1]} dims, the model was fitted on "
                             f"{self.cluster_centers_.shape[1]}")
        return self.cluster_centers_.to(x.device)

    def _assign_backend(self) -> str | None:
        return None if self.backend_ == "cuml" else self.backend_

    def _assign_all(self, data: torch.Tensor, centers: torch.Tensor, backend: str,
                    x_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and distances of every row (``sharded``: this rank's chunks, gathered)."""
        centers = centers.to(data.dtype)
        if not self.sharded:
            return _assign(data, centers, self.metric, self.chunk_size, backend, x_sq)
        rows = shard(data.shape[0], self.chunk_size)
        labels, distances = _assign(data[rows.start:rows.stop], centers, self.metric,
                                    self.chunk_size, backend,
                                    None if x_sq is None else x_sq[rows.start:rows.stop])
        return gather_rows(labels), gather_rows(distances)

    def _update(self, data: torch.Tensor, labels: torch.Tensor,
                distances: torch.Tensor) -> torch.Tensor:
        """New centroids (float32 ``K×D``); empty clusters move to the farthest points."""
        k, d = self.n_clusters, data.shape[1]
        sums = torch.zeros(k, d, dtype=torch.float32, device=data.device)
        for start in range(0, data.shape[0], self.chunk_size):
            sums.index_add_(0, labels[start:start + self.chunk_size],
                            data[start:start + self.chunk_size].float())
        counts = torch.bincount(labels, minlength=k)
        centers = sums / counts.clamp(min=1)[:, None].float()
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = distances.topk(empty.numel()).indices
            centers[empty] = data[far].float()
            log.debug("k-means: relocated %d empty clusters", empty.numel())
        if self.metric == "cosine":
            centers = F.normalize(centers, dim=1)
        return centers

    def _pairwise(self, points: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Distances float32 ``P×N`` used by the init (squared L2, or ``1 − cos``)."""
        dots = (points @ data.T).float()
        if self.metric == "cosine":
            return (1.0 - dots).clamp_(min=0.0)
        sq = data.float().pow(2).sum(1)
        return (points.float().pow(2).sum(1)[:, None] + sq[None, :] - 2.0 * dots).clamp_(min=0)

    def _initial_centers(self, data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = self.n_clusters
        if isinstance(self.init, torch.Tensor):
            init = self.init.to(data.device, torch.float32)
            if tuple(init.shape) != (k, data.shape[1]):
                raise ValueError(f"init tensor must be {(k, data.shape[1])}, "
                                 f"got {tuple(init.shape)}")
            return F.normalize(init, dim=1) if self.metric == "cosine" else init.clone()
        n = data.shape[0]
        if self.init == "random":
            rows = torch.randperm(n, generator=generator, device=data.device)[:k]
            return data[rows].float()
        pool = data
        if self.init_sample is not None and self.init_sample < n:
            if self.init_sample < k:
                raise ValueError(f"init_sample={self.init_sample} is below n_clusters={k}")
            rows = torch.randperm(n, generator=generator, device=data.device)[:self.init_sample]
            pool = data[rows]
        return self._kmeans_plus_plus(pool, generator)

    def _kmeans_plus_plus(self, data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's local-trial variant). No
        step waits for the host: once every point coincides with a chosen centre (potential
        0) the same uniform draws pick candidates uniformly instead, decided on the device."""
        n, k = data.shape[0], self.n_clusters
        trials = 2 + int(math.log(k))
        device = data.device
        chosen = torch.empty(k, dtype=torch.int64, device=device)
        chosen[0] = torch.randint(n, (1,), generator=generator, device=device)[0]
        closest = self._pairwise(data[chosen[:1]], data)[0].double()
        for c in range(1, k):
            potential = closest.sum()
            uniform = torch.rand(trials, generator=generator, device=device, dtype=torch.float64)
            weighted = torch.searchsorted(closest.cumsum(0), uniform * potential)
            candidates = torch.where(potential > 0, weighted,
                                     (uniform * n).long()).clamp_(max=n - 1)
            trial_closest = torch.minimum(closest[None, :],
                                          self._pairwise(data[candidates], data).double())
            best = trial_closest.sum(1).argmin().view(1)  # indexed as a tensor: no .item()
            chosen[c:c + 1] = candidates.index_select(0, best)
            closest = trial_closest.index_select(0, best)[0]
        return data[chosen].float()

    def _fit_cuml(self, data: torch.Tensor) -> KMeans:
        import cupy
        from cuml.cluster import KMeans as CumlKMeans

        # cuML's own "k-means++" is the sequential variant; scikit-learn's name maps to its
        # scalable (k-means||) one
        init = "scalable-k-means++" if isinstance(self.init, str) and self.init == "k-means++" \
            else ("random" if isinstance(self.init, str) else cupy.asarray(self.init.float()))
        model = CumlKMeans(n_clusters=self.n_clusters, max_iter=max(self.n_iter, 1), init=init,
                           n_init=1, random_state=self.seed, tol=self.tol)
        model.fit(cupy.from_dlpack(data.float().contiguous()))
        centers = torch.from_dlpack(cupy.asarray(model.cluster_centers_)).float()
        if self.metric == "cosine":
            centers = F.normalize(centers, dim=1)
        self.init_centers_ = None
        self.n_iter_ = int(getattr(model, "n_iter_", self.n_iter))
        self.cluster_centers_ = centers
        self.labels_, self.distances_ = _assign(data, centers.to(data.dtype), self.metric,
                                                self.chunk_size, "torch")
        self.inertia_ = float(self.distances_.double().sum())
        return self

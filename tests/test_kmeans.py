import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans as SkKMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from fastbd.ops import KMeans, kmeans_assign

from testutil import CPU_BACKENDS, CUDA_BACKENDS, cuda


def true_distances(x, c, metric):
    x, c = x.double(), c.double()
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1) @ F.normalize(c, dim=1).T
    return torch.cdist(x, c).pow(2)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(37, 21, 19), (1, 1, 3), (64, 3, 40)])
def test_assign_picks_the_nearest_centroid(gen, device, backend, metric, dtype, n, k, d):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x = torch.randn(n, d, generator=gen).to(dtype)
    c = torch.randn(k, d, generator=gen).to(dtype)
    labels, dist = kmeans_assign(x.to(device), c.to(device), metric=metric, backend=backend)
    labels, dist = labels.cpu(), dist.cpu()
    exact = true_distances(x, c, metric)
    best = exact.min(1).values
    chosen = exact.gather(1, labels[:, None])[:, 0]
    # Within rounding of the input dtype, the chosen centroid is a nearest one.
    slack = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    scale = 1 + best.abs()
    assert bool(((chosen - best) <= slack * scale).all())
    assert bool(((dist.double() - chosen).abs() <= slack * (1 + chosen.abs())).all())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_autotuned_triton_assign_on_cuda_at_clustering_size(gen, dtype, metric):
    """PoisonCAM's clustering shape (1,000 centroids, 768 dims) through the autotuned kernel:
    every row gets a nearest centroid within the dtype's rounding, as the torch path does."""
    x = torch.randn(5000, 768, generator=gen).to(dtype)
    c = torch.randn(1000, 768, generator=gen).to(dtype)
    labels, _ = kmeans_assign(x.cuda(), c.cuda(), metric=metric, backend="triton")
    exact = true_distances(x, c, metric)
    best = exact.min(1).values
    chosen = exact.gather(1, labels.cpu()[:, None])[:, 0]
    slack = {torch.float32: 1e-4, torch.bfloat16: 2e-1}[dtype]
    assert bool(((chosen - best) <= slack * (1 + best.abs())).all())
    if dtype == torch.float32:  # IEEE float32 products: the torch path's labels, ties aside
        torch_labels, _ = kmeans_assign(x.cuda(), c.cuda(), metric=metric, backend="torch")
        assert (torch_labels.cpu() == labels.cpu()).float().mean() > 0.999


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_assign_empty_rows(backend):
    labels, dist = kmeans_assign(torch.zeros(0, 8), torch.randn(3, 8), backend=backend)
    assert labels.shape == (0,) and dist.shape == (0,) and labels.dtype == torch.int64


def test_same_init_matches_sklearn_inertia(gen):
    x = torch.randn(1500, 12, generator=gen)
    model = KMeans(25, 20, metric="l2", seed=int(torch.randint(1000, (1,), generator=gen)))
    model.fit(x)
    reference = SkKMeans(25, init=model.init_centers_.numpy(), n_init=1, max_iter=20, tol=0,
                         algorithm="lloyd").fit(x.numpy())
    assert model.inertia_ == pytest.approx(reference.inertia_, rel=0.01)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_separable_blobs_are_recovered(seed, metric):
    if metric == "l2":
        x, truth = make_blobs(2000, n_features=16, centers=10, cluster_std=0.5,
                              random_state=seed % 2**31)
        x = torch.tensor(x, dtype=torch.float32)
    else:  # directions: unit centres plus small noise, arbitrary norms
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(10, 16, generator=g), dim=1)
        truth = torch.randint(10, (2000,), generator=g)
        x = (centres[truth] + 0.03 * torch.randn(2000, 16, generator=g)) * (
            1 + 4 * torch.rand(2000, 1, generator=g))
        truth = truth.numpy()
    labels = KMeans(10, 30, metric=metric, seed=seed).fit_predict(x)
    assert adjusted_rand_score(truth, labels.numpy()) >= 0.99


def test_triton_fit_equals_torch_fit(gen):
    x = torch.randn(120, 20, generator=gen)
    a = KMeans(7, 5, seed=3, backend="torch").fit(x)
    b = KMeans(7, 5, seed=3, backend="triton").fit(x)
    assert b.backend_ == "triton"
    assert torch.equal(a.init_centers_, b.init_centers_)
    assert torch.equal(a.labels_, b.labels_)
    torch.testing.assert_close(a.cluster_centers_, b.cluster_centers_)


def test_seed_determinism_and_api(gen):
    x = torch.randn(300, 8, generator=gen)
    a = KMeans(6, seed=11).fit(x)
    b = KMeans(6, seed=11).fit(x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.equal(a.predict(x), a.labels_)
    distances = a.transform(x)
    assert distances.shape == (300, 6)
    torch.testing.assert_close(distances.min(1).values, a.distances_, atol=1e-5, rtol=0)
    assert torch.equal(distances.argmin(1), a.labels_)
    assert a.inertia_ == pytest.approx(float(a.distances_.sum()), rel=1e-5)
    assert torch.allclose(a.cluster_centers_.norm(dim=1), torch.ones(6))


def test_l2_transform_is_euclidean(gen):
    x = torch.randn(50, 4, generator=gen)
    model = KMeans(3, metric="l2").fit(x)
    torch.testing.assert_close(model.transform(x), torch.cdist(x, model.cluster_centers_))


def test_empty_clusters_are_relocated(gen):
    x = torch.randn(200, 5, generator=gen)
    init = x[:4].clone()
    init[1:] = 100.0  # three centres far from every point: empty after the first assignment
    model = KMeans(4, 10, metric="l2", init=init).fit(x)
    assert int(torch.bincount(model.labels_, minlength=4).min()) > 0


def test_k_equals_n(gen):
    x = torch.randn(6, 3, generator=gen)
    model = KMeans(6, metric="l2").fit(x)
    assert sorted(model.labels_.tolist()) == list(range(6))
    # every point is its own centre: zero up to float32 rounding of the expanded distance
    # ‖x‖² − 2x·c + ‖c‖² (a seed gave 4.8e-7 against an absolute 1e-8 bound)
    assert model.inertia_ == pytest.approx(0.0, abs=1e-6 * float((x ** 2).sum()))


@pytest.mark.parametrize("make,error,match", [
    (lambda: KMeans(0), ValueError, "n_clusters"),
    (lambda: KMeans(3, metric="manhattan"), ValueError, "metric"),
    (lambda: KMeans(3, init="farthest"), ValueError, "init"),
    (lambda: KMeans(11).fit(torch.randn(10, 2)), ValueError, "larger than the 10 samples"),
    (lambda: KMeans(2).fit(torch.randn(10)), ValueError, "rank 2"),
    (lambda: KMeans(2).fit(torch.zeros(10, 2, dtype=torch.long)), TypeError, "dtype"),
    (lambda: KMeans(2).fit(torch.tensor([[0.0, float("nan")]] * 4)), ValueError, "NaN"),
    (lambda: KMeans(2).fit(torch.zeros(0, 3)), ValueError, "empty"),
    (lambda: KMeans(2, init=torch.zeros(3, 2)).fit(torch.randn(9, 2)), ValueError, "init tensor"),
    (lambda: KMeans(2).predict(torch.randn(4, 2)), RuntimeError, "not fitted"),
    (lambda: KMeans(2).fit(torch.randn(8, 3)).predict(torch.randn(4, 2)), ValueError, "dims"),
    (lambda: kmeans_assign(torch.randn(4, 3), torch.randn(2, 4)), ValueError, "dims"),
    (lambda: kmeans_assign(torch.randn(4, 3), torch.randn(0, 3)), ValueError, "empty"),
    (lambda: kmeans_assign(torch.randn(4, 3), torch.randn(2, 3, device="meta")), ValueError,
     "different devices"),
    (lambda: kmeans_assign(torch.randn(4, 3), torch.randn(2, 3), backend="cuml"), ValueError,
     "not implemented"),
    (lambda: KMeans(2, backend="cuml").fit(torch.randn(4, 3)), ValueError, "cannot run"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_kmeans_plus_plus_with_fewer_distinct_points_than_clusters():
    """Three distinct points, five clusters: once every point sits on a chosen centre the rest
    are drawn uniformly (decided on the device, no host round trip); every centre is a data
    point, all three points are among them, and the inertia is zero."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
    model = KMeans(5, 3, metric="l2", seed=0, backend="torch").fit(x)
    centres = {tuple(c) for c in model.cluster_centers_.tolist()}
    assert centres == {(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)}
    assert model.inertia_ == 0.0


@pytest.mark.cuda
def test_kmeans_plus_plus_never_waits_for_the_host():
    """On CUDA, choosing the initial centres makes no synchronising call (torch raises on one
    in sync-debug mode "error")."""
    x = torch.randn(4096, 32, device="cuda")
    model = KMeans(64, 0, metric="cosine", seed=0, backend="torch")
    data = model._prepare(x)
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        centres = model._kmeans_plus_plus(data, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert centres.shape == (64, 32)

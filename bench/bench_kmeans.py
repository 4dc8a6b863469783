"""k-means: fastbd KMeans (fused assignment) vs plain torch Lloyd (cdist + argmin) and, on CPU,
scikit-learn's KMeans at equal iterations from the same initial centroids."""

import pytest
import torch

from fastbd.ops import KMeans, kmeans_assign

from benchutil import cuda, record_rates, run

SIZES = {
    "cpu": dict(n=20000, d=128, k=100, iters=20, device="cpu", dtype=torch.float32),
    "gpu": dict(n=127000, d=768, k=1000, iters=20, device="cuda", dtype=torch.bfloat16),
}


def data(n, d, k, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    init = x[torch.randperm(n, generator=g)[:k]].clone()
    return x.to(device, dtype), init.to(device)


def plain_torch_lloyd(x, init, iters):
    """Textbook torch Lloyd: full N×K distance matrix, argmin, scatter-mean."""
    x = x.float()
    centers = init.clone()
    for _ in range(iters):
        labels = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=centers.shape[0]).clamp(min=1)
        centers = sums / counts[:, None]
    return centers


def lloyd_flops(n, d, k, iters):
    return 2.0 * n * d * k * iters


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch", "sklearn"])
def test_kmeans_lloyd_cpu(benchmark, impl):
    """Lloyd only: 20 iterations from the same initial centroids."""
    size = SIZES["cpu"]
    x, init = data(size["n"], size["d"], size["k"], "cpu", size["dtype"])
    if impl == "fastbd":
        fn = lambda: KMeans(size["k"], size["iters"], metric="l2", init=init).fit(x).inertia_
    elif impl == "plain_torch":
        fn = lambda: plain_torch_lloyd(x, init, size["iters"])
    else:
        from sklearn.cluster import KMeans as SkKMeans

        fn = lambda: SkKMeans(size["k"], init=init.numpy(), n_init=1, max_iter=size["iters"],
                              tol=0, algorithm="lloyd").fit(x.numpy()).inertia_
    result = run(benchmark, fn, rounds=3, impl=impl, **{k: str(v) for k, v in size.items()})
    record_rates(benchmark, flop=lloyd_flops(size["n"], size["d"], size["k"], size["iters"]))
    assert result is not None


@pytest.mark.parametrize("impl", ["fastbd", "sklearn"])
def test_kmeans_full_fit_cpu(benchmark, impl):
    """What a user runs: k-means++ init (one init) + 20 Lloyd iterations."""
    size = SIZES["cpu"]
    x, _ = data(size["n"], size["d"], size["k"], "cpu", size["dtype"])
    if impl == "fastbd":
        fn = lambda: KMeans(size["k"], size["iters"], metric="l2", seed=0).fit(x).inertia_
    else:
        from sklearn.cluster import KMeans as SkKMeans

        fn = lambda: SkKMeans(size["k"], n_init=1, max_iter=size["iters"], tol=0,
                              algorithm="lloyd", random_state=0).fit(x.numpy()).inertia_
    inertia = run(benchmark, fn, rounds=3, impl=impl, **{k: str(v) for k, v in size.items()})
    benchmark.extra_info["inertia"] = float(inertia)
    assert inertia > 0


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fastbd_triton", "fastbd_torch", "plain_torch"])
def test_kmeans_gpu(benchmark, impl):
    size = SIZES["gpu"]
    x, init = data(size["n"], size["d"], size["k"], "cuda", size["dtype"])
    if impl == "plain_torch":
        fn = lambda: plain_torch_lloyd(x, init, size["iters"])
    else:
        backend = impl.split("_")[1]
        fn = lambda: KMeans(size["k"], size["iters"], metric="cosine", init=init,
                            backend=backend).fit(x).inertia_
    run(benchmark, fn, rounds=3, impl=impl, **{k: str(v) for k, v in size.items()})
    record_rates(benchmark, flop=lloyd_flops(size["n"], size["d"], size["k"], size["iters"]))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "torch", "matmul_argmin"])
def test_assign_gpu(benchmark, impl):
    """One assignment step: fused kernel vs chunked torch vs one full matmul + argmin."""
    size = SIZES["gpu"]
    x, init = data(size["n"], size["d"], size["k"], "cuda", size["dtype"])
    c = torch.nn.functional.normalize(init, dim=1).to(x.dtype)
    x = torch.nn.functional.normalize(x.float(), dim=1).to(x.dtype)
    if impl == "matmul_argmin":
        fn = lambda: (x @ c.T).argmax(1)
    else:
        fn = lambda: kmeans_assign(x, c, normalized=True, backend=impl)
    run(benchmark, fn, rounds=10, impl=impl, n=size["n"], d=size["d"], k=size["k"])
    record_rates(benchmark, flop=lloyd_flops(size["n"], size["d"], size["k"], 1))


def test_plain_torch_lloyd_computes_what_kmeans_computes():
    """The baseline does the same work: from the same initial centroids, the same centres."""
    x, init = data(600, 8, 5, "cpu", torch.float32)
    expected = plain_torch_lloyd(x, init, 4)
    got = KMeans(5, 4, metric="l2", init=init, backend="torch").fit(x).cluster_centers_
    assert torch.allclose(got, expected, atol=1e-4)

"""The density detector's neighbour search and scores vs the plain torch way its reference
code takes (the full ``cdist`` matrix, fully sorted): a CPU size in CI, CC3M size on a GPU."""

import math

import pytest
import torch

from fastbd.density import density_scores, nearest_neighbours

from benchutil import cuda, record_rates, run, unit_features

SIZES = {
    "cpu": dict(n=6000, d=64, k=32, device="cpu", dtype=torch.float32),
    # CC3M: 3 M pairs × 512 (ViT-B/32 embeddings); the image reference alone.
    "gpu": dict(n=3_000_000, d=512, k=32, device="cuda", dtype=torch.bfloat16),
}


def plain_torch(points, k):
    """The reference code's way: the whole distance matrix, every row sorted."""
    distance = torch.cdist(points.float(), points.float())
    distance.fill_diagonal_(math.inf)
    values, indices = distance.sort(dim=1)
    return values[:, :k], indices[:, :k]


def test_plain_torch_finds_the_same_neighbours():
    size = SIZES["cpu"]
    points = unit_features(1500, size["d"], "cpu", size["dtype"])
    neighbours = nearest_neighbours(points, size["k"])
    _, indices = plain_torch(points, size["k"])
    assert (neighbours.indices == indices).double().mean() > 0.999  # float32 near-ties aside


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_density_neighbours_cpu(benchmark, impl):
    size = SIZES["cpu"]
    points = unit_features(size["n"], size["d"], "cpu", size["dtype"])
    fn = (lambda: nearest_neighbours(points, size["k"])) if impl == "fastbd" else (
        lambda: plain_torch(points, size["k"]))
    run(benchmark, fn, rounds=3, impl=impl, n=size["n"], d=size["d"], k=size["k"])
    record_rates(benchmark, flop=2.0 * size["n"] ** 2 * size["d"])


def test_density_scores_cpu(benchmark):
    size = SIZES["cpu"]
    neighbours = nearest_neighbours(unit_features(size["n"], size["d"], "cpu", size["dtype"]),
                                    size["k"])
    scores = run(benchmark, lambda: density_scores(neighbours, "dao"), rounds=5, n=size["n"],
                 k=size["k"])
    assert scores.shape == (size["n"],) and torch.isfinite(scores).all()


@cuda
@pytest.mark.cuda
def test_density_neighbours_gpu(benchmark):
    """3 M × 3 M × 512 in bf16 through ``cosine_topk``: no similarity matrix is held beyond a
    tile (the full one would be 36 TB in float32)."""
    size = SIZES["gpu"]
    points = unit_features(size["n"], size["d"], "cuda", size["dtype"])
    run(benchmark, lambda: nearest_neighbours(points, size["k"], chunk=16384), rounds=1,
        n=size["n"], d=size["d"], k=size["k"])
    record_rates(benchmark, flop=2.0 * size["n"] ** 2 * size["d"])

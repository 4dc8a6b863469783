"""cosine_topk / pair_cosine vs the plain torch way (full similarity matrix + topk;
F.cosine_similarity)."""

import pytest
import torch
import torch.nn.functional as F

from fastbd.ops import cosine_topk, pair_cosine

from benchutil import cuda, record_rates, run, unit_features

SIZES = {
    "cpu": dict(n=4000, d=128, k=10, device="cpu", dtype=torch.float32),
    "gpu": dict(n=127000, d=768, k=10, device="cuda", dtype=torch.bfloat16),
}


def plain_torch(x, k):
    return (x @ x.T).float().topk(k, dim=1)


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_cosine_topk_cpu(benchmark, impl):
    size = SIZES["cpu"]
    x = unit_features(size["n"], size["d"], "cpu", size["dtype"])
    fn = (lambda: cosine_topk(x, x, size["k"], normalized=True)) if impl == "fastbd" else (
        lambda: plain_torch(x, size["k"]))
    values, _ = run(benchmark, fn, rounds=3, impl=impl, n=size["n"], d=size["d"], k=size["k"])
    record_rates(benchmark, flop=2.0 * size["n"] ** 2 * size["d"])
    assert values.shape == (size["n"], size["k"])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["torch", "triton", "gemm_only"])
def test_cosine_topk_gpu(benchmark, impl):
    """127K × 127K × 768 in bf16. ``triton`` is the fused kernel (no similarity matrix);
    ``gemm_only`` times the same chunked matmuls without the top-k (the bf16 GEMM throughput the
    op is compared with)."""
    size = SIZES["gpu"]
    x = unit_features(size["n"], size["d"], "cuda", size["dtype"])
    if impl == "gemm_only":
        def fn():
            for q0 in range(0, x.shape[0], 4096):
                x[q0:q0 + 4096] @ x.T
    else:
        fn = lambda: cosine_topk(x, x, size["k"], normalized=True, key_chunk=x.shape[0],
                                 backend=impl)
    run(benchmark, fn, rounds=3, impl=impl, n=size["n"], d=size["d"], k=size["k"])
    record_rates(benchmark, flop=2.0 * size["n"] ** 2 * size["d"])


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_pair_cosine_cpu(benchmark, impl):
    a = unit_features(100000, 64, "cpu", torch.float32)
    b = a.roll(1, 0)
    fn = (lambda: pair_cosine(a, b)) if impl == "fastbd" else (
        lambda: F.cosine_similarity(a, b, dim=1))
    assert run(benchmark, fn, impl=impl).shape == (100000,)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "torch", "cupy", "plain_torch"])
def test_pair_cosine_gpu(benchmark, impl):
    if impl == "cupy":
        pytest.importorskip("cupy")
    a = unit_features(500000, 512, "cuda", torch.bfloat16)
    b = a.roll(1, 0)
    fn = (lambda: F.cosine_similarity(a, b, dim=1)) if impl == "plain_torch" else (
        lambda: pair_cosine(a, b, backend=impl))
    run(benchmark, fn, rounds=10, impl=impl, n=500000, d=512)
    record_rates(benchmark, bytes_read=2 * a.numel() * a.element_size())


def test_plain_torch_computes_what_cosine_topk_computes():
    """The baseline does the same work: the same top-k values and (tie-free) indices."""
    x = unit_features(300, 16, "cpu", torch.float32)
    expected = plain_torch(x, 5)
    got = cosine_topk(x, x, 5, normalized=True, backend="torch")
    assert torch.allclose(got[0], expected.values, atol=1e-5)
    assert torch.equal(got[1], expected.indices)
    a, b = unit_features(50, 16, "cpu", torch.float32), unit_features(50, 16, "cpu", torch.float32)
    assert torch.allclose(pair_cosine(a, b), F.cosine_similarity(a, b, dim=1), atol=1e-5)

import pytest
import torch
import torch.nn.functional as F

from fastbd.ops import cosine_topk, pair_cosine

from testutil import CPU_BACKENDS, CUDA_BACKENDS, cuda


def brute_force(query, keys, k, largest=True):
    sims = F.normalize(query.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    return sims.topk(k, dim=1, largest=largest)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("query_chunk,key_chunk", [(4096, 65536), (7, 13), (1, 1000), (50, 3)])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_topk_exact_indices(gen, largest, query_chunk, key_chunk, k):
    query = torch.randn(45, 33, generator=gen)
    keys = torch.randn(301, 33, generator=gen)
    values, indices = cosine_topk(query, keys, k, largest=largest, query_chunk=query_chunk,
                                  key_chunk=key_chunk)
    want_v, want_i = brute_force(query, keys, k, largest)
    torch.testing.assert_close(values.double(), want_v, atol=1e-5, rtol=0)
    exact = F.normalize(query.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    # The returned indices are a true top-k: their exact similarities equal the brute-force
    # values rank by rank (fp32 may order two keys whose cosines differ by < 1e-7 either way).
    torch.testing.assert_close(exact.gather(1, indices), want_v, atol=1e-6, rtol=0)
    assert all(row.unique().numel() == k for row in indices)
    ranked = brute_force(query, keys, k + 1, largest).values  # one past the top-k
    gaps = (ranked[:, 1:] - ranked[:, :-1]).abs() > 1e-6  # gap after each rank
    separated = gaps[:, :k].clone()
    separated[:, 1:] &= gaps[:, :k - 1]
    assert torch.equal(indices[separated], want_i[separated])


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n_query,n_keys,d,k", [(20, 90, 33, 10), (1, 1, 1, 1), (17, 16, 16, 16),
                                                (9, 70, 7, 64), (5, 64, 40, 3)])
def test_fused_triton_topk_equals_the_brute_force(gen, largest, n_query, n_keys, d, k):
    """The fused kernel (through the interpreter): the brute-force values, and indices whose
    exact similarities are the brute-force ones rank by rank; odd sizes, k = K, k = 64."""
    query = torch.randn(n_query, d, generator=gen)
    keys = torch.randn(n_keys, d, generator=gen)
    values, indices = cosine_topk(query, keys, k, largest=largest, backend="triton")
    want_v, _ = brute_force(query, keys, k, largest)
    torch.testing.assert_close(values.double(), want_v, atol=1e-5, rtol=0)
    exact = F.normalize(query.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    torch.testing.assert_close(exact.gather(1, indices), want_v, atol=1e-6, rtol=0)
    assert all(row.unique().numel() == k for row in indices)
    torch_v, torch_i = cosine_topk(query, keys, k, largest=largest, backend="torch")
    torch.testing.assert_close(values, torch_v, atol=1e-5, rtol=0)


def test_fused_topk_breaks_ties_by_the_lower_key_index():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    values, indices = cosine_topk(torch.tensor([[1.0, 0.0]]), keys, 4, backend="triton")
    assert indices.tolist() == [[0, 2, 3, 1]]
    torch.testing.assert_close(values, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_fused_topk_limits():
    x = torch.randn(70, 4)
    with pytest.raises(ValueError, match="k ≤ 64"):
        cosine_topk(x, x, 65, backend="triton")
    with pytest.raises(ValueError, match="bfloat16 only on CUDA"):
        cosine_topk(x.bfloat16(), x.bfloat16(), 3, backend="triton")
    values, indices = cosine_topk(x[:0], x, 3, backend="triton")
    assert values.shape == (0, 3) and indices.shape == (0, 3)


def test_fastbd_backend_triton_falls_back_to_torch_beyond_the_fused_limits(monkeypatch):
    """A process-wide FASTBD_BACKEND=triton must not make a large-k call fail."""
    monkeypatch.setenv("FASTBD_BACKEND", "triton")
    x = torch.randn(80, 6)
    values, indices = cosine_topk(x, x, 70)
    expected_v, expected_i = cosine_topk(x, x, 70, backend="torch")
    assert torch.equal(indices, expected_i) and torch.equal(values, expected_v)


def test_topk_against_itself_finds_self(gen):
    x = torch.randn(100, 16, generator=gen)
    values, indices = cosine_topk(x, x, 3, key_chunk=17)
    assert torch.equal(indices[:, 0], torch.arange(100))
    torch.testing.assert_close(values[:, 0], torch.ones(100), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_query,k", [(0, 3), (5, 0), (0, 0)])
def test_topk_empty(gen, n_query, k):
    values, indices = cosine_topk(torch.randn(n_query, 4, generator=gen),
                                  torch.randn(6, 4, generator=gen), k)
    assert values.shape == (n_query, k) and indices.shape == (n_query, k)


def test_topk_k_equals_n(gen):
    keys = torch.randn(9, 4, generator=gen)
    _, indices = cosine_topk(torch.randn(2, 4, generator=gen), keys, 9, key_chunk=4)
    assert sorted(indices[0].tolist()) == list(range(9))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_low_precision_values(gen, dtype):
    query, keys = torch.randn(20, 64, generator=gen), torch.randn(200, 64, generator=gen)
    values, indices = cosine_topk(query.to(dtype), keys.to(dtype), 4)
    exact = F.normalize(query.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    # The chosen keys' true similarities are within rounding of the true top-4.
    torch.testing.assert_close(exact.gather(1, indices), exact.topk(4, dim=1).values,
                               atol=3e-2, rtol=0)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_cuda_backends(gen, backend):
    query, keys = torch.randn(300, 48, generator=gen), torch.randn(5000, 48, generator=gen)
    values, indices = cosine_topk(query.cuda(), keys.cuda(), 10, key_chunk=999, backend=backend)
    want_v, want_i = brute_force(query, keys, 10)
    assert torch.equal(indices.cpu(), want_i)
    torch.testing.assert_close(values.cpu().double(), want_v, atol=1e-4, rtol=0)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n_query,n_keys,d,k", [(77, 1000, 100, 10), (128, 4096, 768, 64),
                                                (3, 64, 16, 1)])
def test_fused_topk_on_cuda_in_16_bit(gen, dtype, largest, n_query, n_keys, d, k):
    """The compiled kernel (odd and 16-aligned sizes): the values are the similarities of the
    returned keys, and those are the true top-k up to 16-bit rounding."""
    query = F.normalize(torch.randn(n_query, d, generator=gen), dim=1).to(dtype)
    keys = F.normalize(torch.randn(n_keys, d, generator=gen), dim=1).to(dtype)
    values, indices = cosine_topk(query.cuda(), keys.cuda(), k, largest=largest,
                                  normalized=True, backend="triton")
    values, indices = values.cpu().double(), indices.cpu()
    exact = query.double() @ keys.double().T
    assert all(row.unique().numel() == k for row in indices)
    torch.testing.assert_close(exact.gather(1, indices), values, atol=1e-4, rtol=0)
    torch.testing.assert_close(values, exact.topk(k, dim=1, largest=largest).values, atol=1e-2,
                               rtol=0)
    assert torch.all(values[:, 1:] <= values[:, :-1]) if largest else torch.all(
        values[:, 1:] >= values[:, :-1])


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS + [
    pytest.param("cuda", "cupy", marks=[pytest.mark.cuda, cuda], id="cuda-cupy")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(41, 70), (1, 1), (0, 5), (130, 512)])
def test_pair_cosine_backends(gen, device, backend, dtype, n, d):
    if backend == "cupy":
        pytest.importorskip("cupy")
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    a = torch.randn(n, d, generator=gen).to(dtype)
    b = torch.randn(n, d, generator=gen).to(dtype)
    got = pair_cosine(a.to(device), b.to(device), backend=backend).cpu()
    want = F.cosine_similarity(a.double(), b.double(), dim=1)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}[dtype]
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pair_cosine_zero_rows_and_strides(gen, backend):
    a = torch.randn(6, 10, generator=gen)
    a[2] = 0
    b = torch.randn(10, 6, generator=gen).T  # non-contiguous rows
    got = pair_cosine(a, b, backend=backend)
    assert float(got[2]) == 0.0
    torch.testing.assert_close(got, pair_cosine(a, b.contiguous(), backend="torch"))


@pytest.mark.parametrize("call,error,match", [
    (lambda: cosine_topk(torch.randn(3, 4), torch.randn(5, 4), 6), ValueError, "larger than"),
    (lambda: cosine_topk(torch.randn(3, 4), torch.randn(5, 3), 2), ValueError, "dims"),
    (lambda: cosine_topk(torch.randn(3, 4), torch.randn(5, 4), -1), ValueError, "non-negative"),
    (lambda: cosine_topk(torch.randn(4), torch.randn(5, 4), 1), ValueError, "rank 2"),
    (lambda: cosine_topk(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4), 1), TypeError,
     "dtype"),
    (lambda: cosine_topk(torch.full((3, 4), float("nan")), torch.randn(5, 4), 1), ValueError,
     "NaN"),
    (lambda: cosine_topk(torch.randn(3, 4), torch.randn(5, 4, device="meta"), 1), ValueError,
     "different devices"),
    (lambda: cosine_topk(torch.randn(3, 4), torch.randn(5, 4), 1, backend="opencl"),
     ValueError, "not implemented"),
    (lambda: pair_cosine(torch.randn(3, 4), torch.randn(2, 4)), ValueError, "rows"),
    (lambda: pair_cosine(torch.randn(3, 4), torch.randn(3, 4), backend="cupy"), ValueError,
     "cannot run"),
    (lambda: pair_cosine(torch.randn(3, 4), torch.tensor([[float("inf")] * 4] * 3)), ValueError,
     "NaN/Inf"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_finite_check_by_sum_is_exact(dtype):
    """``all_finite`` decides by a sum: a NaN or Inf anywhere fails it, finite values whose
    sum overflows (or cancels to ±Inf) do not."""
    from fastbd.ops import all_finite

    big = torch.finfo(dtype).max
    huge = torch.full((64,), big, dtype=dtype)  # the sum overflows: all values finite
    assert all_finite(huge) and all_finite(torch.cat([huge, -huge]))
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.randn(1000).to(dtype)
        values[617] = bad
        assert not all_finite(values)
        with pytest.raises(ValueError, match="contains 1 NaN/Inf"):
            pair_cosine(values.float().view(100, 10), torch.ones(100, 10))
    both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # sums to NaN
    assert not all_finite(both)

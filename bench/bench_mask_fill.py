"""mask_fill: fused masking + normalisation vs the plain torch way (normalise, repeat, zero)."""

import pytest
import torch

from fastbd.ops import mask_fill

from benchutil import HAS_CUDA, copy_bandwidth_bytes_per_s, cuda, record_rates, run, seconds

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = {
    "cpu": dict(n=2, m=32, size=64, window=16, dtype=torch.float32, device="cpu"),
    "gpu": dict(n=8, m=256, size=224, window=60, dtype=torch.bfloat16, device="cuda"),
}


def plain_torch(images, positions, window, mean, std, dtype):
    """What one writes without the op: normalise, repeat per mask, zero each window by slicing
    (four slices per mask for the cyclic wrap)."""
    n, m = positions.shape[:2]
    size = images.shape[-1]
    normalised = ((images.float() / 255 - mean) / std).to(dtype)
    out = normalised.repeat_interleave(m, dim=0)
    for v, (y, x) in enumerate(positions.reshape(-1, 2).tolist()):
        for ys in ((y, min(y + window, size)), (0, max(y + window - size, 0))):
            for xs in ((x, min(x + window, size)), (0, max(x + window - size, 0))):
                out[v, :, ys[0]:ys[1], xs[0]:xs[1]] = 0
    return out


def inputs(n, m, size, window, dtype, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    positions = torch.randint(0, size, (n, m, 2), generator=g)
    return images.to(device), positions.to(device)


def bench(benchmark, impl, n, m, size, window, dtype, device):
    images, positions = inputs(n, m, size, window, dtype, device)
    out = torch.empty(n * m, 3, size, size, dtype=dtype, device=device)
    mean = torch.tensor(MEAN, device=device)[:, None, None]
    std = torch.tensor(STD, device=device)[:, None, None]
    if impl == "fastbd":
        fn = lambda: mask_fill(images, positions, window, MEAN, STD, out=out)
    else:
        fn = lambda: plain_torch(images, positions, window, mean, std, dtype)
    result = run(benchmark, fn, impl=impl, n=n, m=m, size=size, window=window, dtype=str(dtype))
    written = out.numel() * out.element_size()
    record_rates(benchmark, images=n * m, bytes_written=written)
    return result, written


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_mask_fill_cpu(benchmark, impl):
    result, _ = bench(benchmark, impl, **SIZES["cpu"])
    assert result.shape[0] == SIZES["cpu"]["n"] * SIZES["cpu"]["m"]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_mask_fill_gpu(benchmark, impl):
    result, written = bench(benchmark, impl, **SIZES["gpu"])
    median = seconds(benchmark)
    if median and HAS_CUDA:
        bandwidth = copy_bandwidth_bytes_per_s()
        # The op reads n·S² uint8 per channel once per mask (cached) and writes the output.
        benchmark.extra_info["fraction_of_copy_bandwidth"] = written / median / bandwidth
    assert result.shape[0] == SIZES["gpu"]["n"] * SIZES["gpu"]["m"]


@pytest.mark.parametrize("window", [5, 9])
def test_plain_torch_computes_what_mask_fill_computes(window):
    """The baseline does the same work: equal outputs at a small size, wrap included."""
    images, positions = inputs(2, 6, 12, window, torch.float32, "cpu")
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    expected = plain_torch(images, positions, window, mean, std, torch.float32)
    got = mask_fill(images, positions, window, MEAN, STD, backend="torch")
    assert torch.allclose(got, expected, atol=1e-5)

"""window_argmax (integral image) vs the plain torch way (avg_pool2d box sums + argmax)."""

import pytest
import torch
import torch.nn.functional as F

from fastbd.ops import window_argmax

from benchutil import cuda, run


def plain_torch(maps, window):
    sums = F.avg_pool2d(maps[:, None].double(), window, stride=1)[:, 0]
    flat = sums.flatten(1).argmax(1)
    return torch.stack([flat // sums.shape[2], flat % sums.shape[2]], 1)


def bench(benchmark, impl, device, batch):
    maps = torch.rand(batch, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    fn = (lambda: window_argmax(maps, 60)[0]) if impl == "fastbd" else (
        lambda: plain_torch(maps, 60))
    positions = run(benchmark, fn, impl=impl, batch=batch, size=224, window=60)
    assert positions.shape == (batch, 2)


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_window_argmax_cpu(benchmark, impl):
    bench(benchmark, impl, "cpu", 16)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_window_argmax_gpu(benchmark, impl):
    bench(benchmark, impl, "cuda", 1024)


def test_plain_torch_computes_what_window_argmax_computes():
    """The baseline does the same work: the same window corners."""
    maps = torch.rand(6, 30, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(window_argmax(maps, 7)[0], plain_torch(maps, 7))

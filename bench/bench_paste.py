"""paste: batched trigger pasting into normalised encoder input vs the plain torch way
(clone the test images per candidate, slice-assign the patch, normalise)."""

import pytest
import torch

from fastbd.ops import paste

from benchutil import HAS_CUDA, copy_bandwidth_bytes_per_s, cuda, record_rates, run, seconds

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = {
    "cpu": dict(candidates=4, images=32, size=64, patch=16, dtype=torch.float32, device="cpu"),
    "gpu": dict(candidates=16, images=1000, size=224, patch=60, dtype=torch.bfloat16,
                device="cuda"),
}


def inputs(candidates, images, size, patch, device):
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g)
    patches = torch.randint(0, 256, (candidates, 3, patch, patch), dtype=torch.uint8, generator=g)
    jobs = candidates * images
    image_index = torch.arange(images).repeat(candidates)
    patch_index = torch.arange(candidates).repeat_interleave(images)
    ys = torch.randint(0, size - patch + 1, (jobs,), generator=g)
    xs = torch.randint(0, size - patch + 1, (jobs,), generator=g)
    return [t.to(device) for t in (bank, patches, image_index, patch_index, ys, xs)]


def plain_torch(bank, patches, ys, xs, mean, std, dtype):
    outputs = []
    for c in range(patches.shape[0]):
        canvas = bank.clone()
        span = slice(c * bank.shape[0], (c + 1) * bank.shape[0])
        p = patches.shape[-1]
        for i, (y, x) in enumerate(zip(ys[span].tolist(), xs[span].tolist(), strict=True)):
            canvas[i, :, y:y + p, x:x + p] = patches[c]
        outputs.append(((canvas.float() / 255 - mean) / std).to(dtype))
    return torch.cat(outputs)


def bench(benchmark, impl, candidates, images, size, patch, dtype, device):
    bank, patches, image_index, patch_index, ys, xs = inputs(candidates, images, size, patch,
                                                             device)
    out = torch.empty(candidates * images, 3, size, size, dtype=dtype, device=device)
    if impl == "fastbd":
        fn = lambda: paste(bank, patches, image_index, patch_index, ys, xs, mean=MEAN, std=STD,
                           out=out)
    else:
        mean = torch.tensor(MEAN, device=device)[:, None, None]
        std = torch.tensor(STD, device=device)[:, None, None]
        fn = lambda: plain_torch(bank, patches, ys, xs, mean, std, dtype)
    result = run(benchmark, fn, impl=impl, candidates=candidates, images=images, size=size,
                 patch=patch, dtype=str(dtype))
    written = out.numel() * out.element_size()
    record_rates(benchmark, images=candidates * images, bytes_written=written)
    return result, written


@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_paste_cpu(benchmark, impl):
    result, _ = bench(benchmark, impl, **SIZES["cpu"])
    assert result.shape[0] == SIZES["cpu"]["candidates"] * SIZES["cpu"]["images"]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fastbd", "plain_torch"])
def test_paste_gpu(benchmark, impl):
    result, written = bench(benchmark, impl, **SIZES["gpu"])
    median = seconds(benchmark)
    if median and HAS_CUDA:
        benchmark.extra_info["fraction_of_copy_bandwidth"] = (
            written / median / copy_bandwidth_bytes_per_s())
    assert result.shape[0] == SIZES["gpu"]["candidates"] * SIZES["gpu"]["images"]


def test_plain_torch_computes_what_paste_computes():
    """The baseline does the same work: equal outputs at a small size."""
    bank, patches, image_index, patch_index, ys, xs = inputs(3, 5, 16, 4, "cpu")
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    expected = plain_torch(bank, patches, ys, xs, mean, std, torch.float32)
    got = paste(bank, patches, image_index, patch_index, ys, xs, mean=MEAN, std=STD,
                backend="torch")
    assert torch.allclose(got, expected, atol=1e-5)

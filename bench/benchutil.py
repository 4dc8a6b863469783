"""Shared benchmark helpers (imported by the bench modules).

CPU sizes run everywhere (CI runs them once with ``--benchmark-disable``); GPU sizes are marked
``cuda`` and skipped without a GPU. Timed targets end with a CUDA synchronisation, so wall time
is device time. Every fast path is benchmarked beside the plain torch way in the same run; the
JSON written with ``--benchmark-json`` carries the GPU, versions and sizes.
"""


import pytest
import torch
import torch.nn.functional as F

from fastbd.detection.clustering import ClusteringModel
from fastbd.models import encoder_by_name

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def unit_features(n: int, d: int, device, dtype) -> torch.Tensor:
    """Seeded random unit rows ``n×d`` (embeddings for the similarity benches)."""
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype)


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def run(benchmark, fn, *, rounds: int = 5, warmup: int = 1, **info):
    """Time ``fn`` (synchronised) and record ``info`` plus the device in ``extra_info``."""

    def target():
        value = fn()
        sync()
        return value

    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    return benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup)


def seconds(benchmark) -> float | None:
    """Median seconds of the last run, or None when benchmarking is disabled."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def record_rates(benchmark, **totals) -> None:
    """Put per-second rates (``total / median``) into ``extra_info``, e.g. images=…, bytes=…."""
    median = seconds(benchmark)
    if median:
        for name, total in totals.items():
            benchmark.extra_info[f"{name}_per_s"] = total / median


def copy_bandwidth_bytes_per_s(n_bytes: int = 2**30, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * n_bytes * repeats / (start.elapsed_time(end) / 1e3)


def stage_setup(arch: str, size: int, n_images: int, dtype: torch.dtype, device):
    """A random-weight ``encoder_by_name(arch)`` in ``dtype`` on ``device``, ``n_images`` random
    uint8 images there, a 16-cluster model on their features, and ``encode_assign`` (normalised
    input → cluster ids, distances) — what the PoisonCAM stage benchmarks run."""
    encoder = encoder_by_name(arch, image_size=size).to(device).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8,
                         generator=g).to(device)
    with torch.no_grad():
        feats = encoder(encoder.normalise(bank[:64])).float()
    clustering = ClusteringModel(F.normalize(feats[:16], dim=1))

    def encode_assign(x):
        with torch.no_grad():
            return clustering.assign(encoder(x).float())

    return encoder, bank, clustering, encode_assign

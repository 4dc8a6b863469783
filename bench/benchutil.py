"""Shared benchmark helpers (imported by the bench modules).

CPU sizes run everywhere (CI runs them once with ``--benchmark-disable``); GPU sizes are marked
``cuda`` and skipped without a GPU. Timed targets end with a CUDA synchronisation, so wall time
is device time. Every fast path is benchmarked beside the plain torch way in the same run; the
JSON written with ``--benchmark-json`` carries the GPU, versions and sizes.
"""


import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


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

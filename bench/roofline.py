"""The performance model: for each op at its GPU benchmark size and for PoisonCAM's stages at
ImageNet-100 scale, the bytes and FLOPs counted from the code, the floor they set on an H100 and
an H200 (bytes over copy bandwidth, FLOPs over the bf16 matmul rate — the larger), an estimate
of what the current code takes (the floor times the overheads named beside it: estimates, not
measurements), and the measured time once a GPU run (``bench/gpu_validate.sh``) supplies one.

``python bench/scale.py --page`` puts the table in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

MACHINES = {"H100": {"bytes_per_s": 3.0e12, "flop_per_s": 800e12},
            "H200": {"bytes_per_s": 4.3e12, "flop_per_s": 790e12}}
"""Measured ceilings (REFERENCE.md: an H100 device copy ~3.0 TB/s and bf16 GEMM ~800 TFLOP/s;
on this workplace's H200s a copy moved 4.3 TB/s and an 8192³ bf16 product ran at 769–798)."""

BF16 = 2


@dataclass(frozen=True)
class Entry:
    """One op or stage: ``bytes`` it must move and ``flop`` it must do (counted from the code at
    ``size``), the ``overhead`` factor the current code is estimated to pay over the floor and
    ``why``; ``benchmark``: the pytest-benchmark name whose median is the measured figure."""

    name: str
    size: str
    bytes: float
    flop: float
    overhead: float
    why: str
    benchmark: str | None = None

    def floor_s(self, machine: str) -> float:
        rates = MACHINES[machine]
        return max(self.bytes / rates["bytes_per_s"], self.flop / rates["flop_per_s"])

    def bound(self, machine: str) -> str:
        rates = MACHINES[machine]
        memory = self.bytes / rates["bytes_per_s"]
        return "memory" if memory >= self.flop / rates["flop_per_s"] else "compute"


def entries() -> list[Entry]:
    """The model's rows (sizes as in ``bench/bench_*.py``'s GPU cases)."""
    s2 = 224 * 224
    n_masked = 8 * 256                      # mask_fill: 8 images × 256 masks
    jobs = 16 * 1000                        # paste: 16 candidates × 1,000 test images
    n, d, k = 127_000, 768, 1000            # kmeans_assign
    pairs = 500_000                         # pair_cosine, 512-d
    return [
        Entry("mask_fill", "8 × 256 masks × 3 × 224², bf16 out",
              bytes=n_masked * 3 * s2 * BF16 + 8 * 3 * s2, flop=2.0 * n_masked * 3 * s2,
              overhead=1.3, why="stores only; rows padded to 256 lanes (12.5 % idle)",
              benchmark="test_mask_fill_gpu[fastbd]"),
        Entry("paste", "16 × 1,000 jobs, 60² into 224², bf16 out",
              bytes=jobs * 3 * s2 * BF16 + 16 * 1000 * 3 * s2, flop=8.0 * jobs * 3 * s2,
              overhead=1.3, why="the 150-MB test set is re-read per candidate (> 50 MB L2); "
              "row padding", benchmark="test_paste_gpu[fastbd]"),
        Entry("kmeans_assign", "127,000 × 768 → 1,000, bf16",
              bytes=n * d * BF16 + k * d * BF16 + n * 12, flop=2.0 * n * k * d,
              overhead=2.5, why="autotuned tiles up to 128 × 128 × 32 in two warpgroups "
              "(sm_90: m64n128k16 wgmma, 147–171 registers) re-read every centroid per 128 rows "
              "(~1.5 GB of L2 reads, as long as the product) — the torch path (GEMM + argmin, "
              "about the same estimate) stays the default until measured",
              benchmark="test_assign_gpu[triton]"),
        Entry("cosine_topk", "127,000² × 768, k = 10, bf16",
              bytes=n * d * BF16 * 2 + n * 10 * 8 + (n * n * (BF16 + 4 + 4)),
              flop=2.0 * n * n * d, overhead=1.0,
              why="the torch path writes every 4,096-row tile of similarities, upcasts and "
              "selects from it: the N² bytes in the count (a fused GEMM + running top-k "
              "would leave the 31-ms GEMM floor)", benchmark="test_cosine_topk_gpu[torch]"),
        Entry("cosine_topk, fused (backend='triton')", "127,000² × 768, k = 10, bf16",
              bytes=n * d * BF16 * 2 + n * 10 * 12, flop=2.0 * n * n * d, overhead=5.0,
              why="selection-bound, estimated from the sm_90 PTX: per 64×64 tile each of 8 "
              "warps issues ~3,000 instructions of int64 bitonic top-k and merge (368 shuffles) "
              "beside ~1,500 of wgmma K-loop: ~1.4e11 warp instructions, ~140 ms at an H100's "
              "~1e12 issue rate, more where int64 ops split; it needs no similarity workspace "
              "(the torch path's 4,096-row tile is 2 GB here)",
              benchmark="test_cosine_topk_gpu[triton]"),
        Entry("pair_cosine", "500,000 × 512 pairs, bf16",
              bytes=2 * pairs * 512 * BF16 + pairs * 4, flop=6.0 * pairs * 512, overhead=1.5,
              why="16 rows per program: short rows leave the copy engine underused",
              benchmark="test_pair_cosine_gpu[triton]"),
        Entry("PoisonCAM search, ImageNet-100, ViT-B/16", "~8,000 images × (256 masks + "
              "1,000 flip tests) ≈ 10 M forwards", bytes=10e6 * 3 * s2 * BF16,
              flop=10e6 * 35.2e9, overhead=4.0,
              why="the encoder at ~25 % of bf16 peak (published ViT-B/16 inference rates); "
              "input generation < 1 % of it"),
    ]


def measured_s(benchmarks: dict | None, name: str | None) -> float | None:
    """The median seconds of benchmark ``name`` in a pytest-benchmark JSON, if present."""
    if not benchmarks or not name:
        return None
    for bench in benchmarks.get("benchmarks", []):
        if bench.get("name") == name:
            return float(bench["stats"]["median"])
    return None


def table(benchmarks: dict | None = None, gpu: str = "") -> str:
    """The model as Markdown; the measured column from a GPU run's benchmark JSON."""
    head = ("| op / stage | size | GB | TFLOP | bound | H100 floor | H200 floor | estimate "
            "(H100) | measured | what the estimate charges |")
    lines = [head, "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for e in entries():
        got = measured_s(benchmarks, e.benchmark)
        lines.append(
            f"| {e.name} | {e.size} | {e.bytes / 1e9:,.2f} | {e.flop / 1e12:,.3f} | "
            f"{e.bound('H100')} | {readable_time(e.floor_s('H100'))} | "
            f"{readable_time(e.floor_s('H200'))} | "
            f"{readable_time(e.overhead * e.floor_s('H100'))} | "
            f"{readable_time(got) + (' ' + gpu if gpu else '') if got is not None else 'not yet'}"
            " | "
            f"{e.why} |")
    return "\n".join(lines)


def readable_time(seconds: float) -> str:
    """``seconds`` as ms, s or min, whichever reads best."""
    if seconds >= 60:
        return f"{seconds / 60:,.1f} min"
    if seconds >= 1:
        return f"{seconds:,.2f} s"
    return f"{seconds * 1e3:,.3f} ms"


def section(benchmarks: dict | None = None, gpu: str = "") -> list[str]:
    """The performance-model section of the performance page, as lines."""
    return ["## Performance model", "",
            "Bytes and FLOPs counted from the code at the GPU benchmark sizes; the floor is the "
            "larger of bytes ÷ copy bandwidth and FLOPs ÷ bf16 matmul rate (H100 3.0 TB/s, "
            "800 TFLOP/s; H200 4.3 TB/s, 790 TFLOP/s, measured). The estimate is the floor "
            "times the overhead the last column names — an estimate from the compiled code "
            "(`bench/kernel_compile.py`), not a measurement.", "", table(benchmarks, gpu), ""]

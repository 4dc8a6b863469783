"""Ops smoke run: every op on every available backend, checked against the torch reference."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastbd.ops import (
    KMeans,
    available_backends,
    cosine_topk,
    kmeans_assign,
    mask_fill,
    pair_cosine,
    paste,
    window_argmax,
)
from fastbd.storage import output_dir, write_text_atomically

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SmokeConfig:
    """Sizes of the smoke run (small enough for two CPU cores in seconds)."""

    image_size: int = 64
    n_images: int = 8
    n_masks: int = 16
    window: int = 16
    n_features: int = 2000
    dim: int = 64
    n_clusters: int = 20
    seed: int = 0


@dataclass
class SmokeCheck:
    op: str
    backend: str
    seconds: float
    max_abs_error: float
    ok: bool


@dataclass
class SmokeResult:
    device: str
    checks: list[SmokeCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {"device": self.device, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def save(self, directory: str | Path) -> Path:
        return write_text_atomically(json.dumps(self.to_dict(), indent=2),
                                     output_dir(directory) / "smoke.json")


def _timed(fn: Callable[[str], torch.Tensor], backend: str, device: torch.device
           ) -> tuple[torch.Tensor, float]:
    """``fn(backend)`` and its wall time, synchronising CUDA before the clock stops."""
    start = time.perf_counter()
    value = fn(backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def run_smoke(device: str | torch.device = "cpu", config: SmokeConfig | None = None,
              skip_interpreted: bool = True) -> SmokeResult:
    """Run each op on each available backend of ``device`` and compare with ``backend='torch'``.

    ``skip_interpreted`` leaves out Triton on CPU (the interpreter is for tests, ~10³× slower).
    """
    config = config or SmokeConfig()
    device = torch.device(device)
    g = torch.Generator().manual_seed(config.seed)
    s = config.image_size
    images = torch.randint(0, 256, (config.n_images, 3, s, s), dtype=torch.uint8, generator=g)
    positions = torch.randint(0, s, (config.n_images, config.n_masks, 2), generator=g)
    patches = torch.randint(0, 256, (4, 3, config.window, config.window), dtype=torch.uint8,
                            generator=g)
    jobs = [torch.randint(0, config.n_images, (32,), generator=g),
            torch.randint(0, 4, (32,), generator=g),
            torch.randint(0, s - config.window, (32,), generator=g),
            torch.randint(0, s - config.window, (32,), generator=g)]
    features = torch.randn(config.n_features, config.dim, generator=g)
    centroids = torch.randn(config.n_clusters, config.dim, generator=g)
    maps = torch.rand(config.n_images, s, s, generator=g)
    to = lambda t: t.to(device)
    cases: dict[str, Callable[[str], torch.Tensor]] = {
        "mask_fill": lambda b: mask_fill(to(images), to(positions), config.window,
                                         IMAGENET_MEAN, IMAGENET_STD, backend=b),
        "paste": lambda b: paste(to(images), to(patches), *map(to, jobs), mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, backend=b),
        "kmeans_assign": lambda b: kmeans_assign(to(features), to(centroids), backend=b)[1],
        "kmeans": lambda b: torch.tensor(KMeans(config.n_clusters, 10, seed=config.seed,
                                                backend=b).fit(to(features)).inertia_),
        "cosine_topk": lambda b: cosine_topk(to(features[:200]), to(features), 5, backend=b)[0],
        "pair_cosine": lambda b: pair_cosine(to(features), to(features.roll(1, 0)), backend=b),
        "window_argmax": lambda b: window_argmax(to(maps), config.window, backend=b)[1],
    }
    result = SmokeResult(device=str(device))
    for op, run in cases.items():
        reference = run("torch").cpu().double()
        for backend in available_backends(op, device):
            if skip_interpreted and backend == "triton" and device.type == "cpu":
                continue
            value, seconds = _timed(run, backend, device)
            error = float((value.cpu().double() - reference).abs().max()) if reference.numel() \
                else 0.0
            tolerance = 1e-3 * (1 + float(reference.abs().max())) if reference.numel() else 0.0
            result.checks.append(SmokeCheck(op, backend, seconds, error, error <= tolerance))
            log.info("%s[%s] %.4fs max|err| %.2e", op, backend, seconds, error)
    return result

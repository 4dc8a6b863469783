"""A small SimCLR trainer: trains an ``Encoder`` on an unlabeled uint8 image set (the threat
model of the SSL demos; the same code trains real backbones on a GPU)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastbd.models.encoders import Encoder
from fastbd.ssl.augment import AugmentConfig, augment

log = logging.getLogger(__name__)


@dataclass
class SSLConfig:
    """SimCLR hyperparameters (NT-Xent, AdamW, cosine schedule with linear warm-up)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.2
    projection_dim: int = 128
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0


@dataclass
class SSLHistory:
    losses: list[float]
    seconds: float
    images_per_second: float
    config: dict


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR loss of two views' projections ``N×P`` (each row's positive is its other view)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    n = z1.shape[0]
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def train_simclr(encoder: Encoder, images: torch.Tensor, config: SSLConfig | None = None, *,
                 device: torch.device | str = "cpu", verbose: bool = True) -> SSLHistory:
    """Train ``encoder`` in place on uint8 ``N×3×S×S`` images with SimCLR."""
    config = config or SSLConfig()
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} "
                         f"{tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"SimCLR needs at least 2 images, got {n}")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    encoder.to(device).train()
    dim = encoder.feature_dim
    head = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, config.projection_dim)).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch * config.warmup_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
        0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    g = torch.Generator(device=device).manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed)
    mean = torch.tensor(encoder.mean, device=device)[:, None, None]
    std = torch.tensor(encoder.std, device=device)[:, None, None]
    bank = images.to(device)
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="SimCLR", disable=not verbose, unit="step")
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=order_gen)
        for step in range(steps_per_epoch):
            rows = bank[order[step * batch:(step + 1) * batch].to(device)]
            v1 = augment(rows, config.augment, mean, std, g)
            v2 = augment(rows, config.augment, mean, std, g)
            loss = nt_xent(head(encoder(v1)), head(encoder(v2)), config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    encoder.eval()
    log.info("SimCLR: %d steps in %.1fs, final loss %.3f", total, seconds,
             losses[-1] if losses else float("nan"))
    return SSLHistory(losses=losses, seconds=seconds,
                      images_per_second=2 * total * batch / max(seconds, 1e-9),
                      config=asdict(config))

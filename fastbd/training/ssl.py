"""A small self-supervised trainer: SimCLR (NT-Xent with in-batch negatives), BYOL (online
network with a predictor regressing an EMA target network, no negatives) or MoCo v3 (the same
online/momentum pair, trained with InfoNCE between the online prediction and the momentum
network's projection of the other view, in-batch keys as negatives). Trains an ``Encoder``
on an unlabeled uint8 image set — the threat model of the SSL demos; the same code trains real
backbones on a GPU."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastbd.data.augment import AugmentConfig, augment
from fastbd.distributed import average_gradients, sharded_forward
from fastbd.models.encoders import Encoder, seeded_rng
from fastbd.schedules import adamw, warmup_cosine
from fastbd.storage import TrainingState
from fastbd.training.global_bn import global_batch_norm
from fastbd.validation import above, at_least, check_fields, fraction, one_of

log = logging.getLogger(__name__)


SSL_METHODS = ("simclr", "byol", "mocov3")


@dataclass
class SSLConfig:
    """Hyperparameters (AdamW, cosine schedule with linear warm-up). ``method``: ``simclr``
    (``temperature``), ``byol`` (target EMA ``momentum`` rising to 1 on a cosine) or ``mocov3``
    (both: the momentum network as BYOL's, the loss an InfoNCE at ``temperature``).
    ``icutmix`` (MoCo v3 only, PatchSearch's post-defense recipe, ``--icutmix --alpha 1.0`` in
    its ``moco/builder.py``): each batch's online views are CutMix-ed with a shuffled copy of
    the batch (``cutmix_views``, ``icutmix_alpha``) and the loss weighs each view's own key by
    the kept area λ and its partner's by 1 − λ (``moco_loss``); the momentum keys stay
    unmixed."""

    method: str = "simclr"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.2
    momentum: float = 0.99
    projection_dim: int = 128
    icutmix: bool = False
    icutmix_alpha: float = 1.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, method=one_of(*SSL_METHODS), epochs=at_least(0),
                     batch_size=at_least(2), lr=above(0), weight_decay=at_least(0),
                     warmup_epochs=at_least(0), temperature=above(0), momentum=fraction(),
                     projection_dim=at_least(1), icutmix_alpha=above(0), seed=at_least(0))
        if self.icutmix and self.method != "mocov3":
            raise ValueError(f"icutmix follows PatchSearch's MoCo v3 recipe; method "
                             f"{self.method!r} has no partner-weighted loss (use mocov3)")


@dataclass
class SSLHistory:
    """What a training run leaves: per-step ``losses``, time, throughput, the config, and
    ``evaluations``: what ``evaluate`` returned after each epoch it ran after (with the
    ``epoch``)."""

    losses: list[float]
    seconds: float
    images_per_second: float
    config: dict
    evaluations: list[dict] = field(default_factory=list)


EpochEvaluation = Callable[[Encoder], dict]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR loss of two views' projections ``N×P`` (each row's positive is its other view)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    n = z1.shape[0]
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss ``2 − 2·cos`` averaged over the batch (target without gradient)."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)).mean()


def moco_loss(prediction: torch.Tensor, key: torch.Tensor, temperature: float,
              partner: torch.Tensor | None = None, kept: float = 1.0) -> torch.Tensor:
    """MoCo v3's loss of online predictions and momentum keys ``B×P`` (row i's positive is key
    i, the other keys its negatives; key without gradient), scaled by ``2·temperature`` as in
    the paper so its gradient does not depend on the temperature. i-CutMix: with ``partner``
    (int64 ``B``: the row whose pixels were mixed into row i) the loss is ``kept`` × that loss
    plus (1 − ``kept``) × the same with row i's positive key ``partner[i]``."""
    logits = F.normalize(prediction, dim=1) @ F.normalize(key.detach(), dim=1).T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, targets)
    if partner is not None:
        loss = kept * loss + (1 - kept) * F.cross_entropy(logits, partner.to(logits.device))
    return 2 * temperature * loss


def cutmix_views(views: torch.Tensor, alpha: float, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """i-CutMix of a batch (float ``B×C×S×S``), as PatchSearch's ``moco/builder.py``: λ from
    Beta(``alpha``, ``alpha``), made ≥ ½; one box of side ``⌊S·√(1 − λ)⌋`` centred at a
    uniform pixel, clipped to the image, takes the pixels of a shuffled copy of the batch;
    λ is then the share of the image left unchanged. Returns (mixed views, int64 ``B`` partner
    of each row, λ). All draws from ``generator``."""
    import numpy as np

    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = max(lam, 1 - lam)
    size = views.shape[-1]
    cut = int(size * math.sqrt(1 - lam))
    cy, cx = torch.randint(0, size, (2,), generator=generator, device=generator.device).tolist()
    top, bottom = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    left, right = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    partner = torch.randperm(views.shape[0], generator=generator,
                             device=generator.device).to(views.device)
    mixed = views.clone()
    mixed[..., top:bottom, left:right] = views[partner][..., top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (size * size)
    return mixed, partner, kept


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


ViewHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def train_ssl(encoder: Encoder, images: torch.Tensor, config: SSLConfig | None = None, *,
              device: torch.device | str = "cpu", verbose: bool = True,
              view_hook: ViewHook | None = None,
              checkpoint: str | Path | None = None,
              evaluate: EpochEvaluation | None = None, evaluate_every: int = 1) -> SSLHistory:
    """Train ``encoder`` in place on uint8 ``N×3×S×S`` images (SimCLR, BYOL or MoCo v3).

    ``view_hook(index, v1, v2)``, if given, sees each batch's image indices (int64 ``B``) and its
    two augmented, normalised views (float ``B×3×S×S``) and returns the views to train on —
    for experiments that choose some positive pairs themselves.

    ``evaluate(encoder)``, if given, runs after every ``evaluate_every``-th epoch and after the
    last, with the encoder in eval mode and the random state forked (training continues as it
    would without it); its dicts, with their ``epoch``, are ``history.evaluations`` and are
    kept in the checkpoint, so a resumed run has them all.

    ``checkpoint``: a file the whole training state (weights, optimizer, schedule, random
    streams, losses) is written to after every epoch, atomically. If it exists when training
    starts, training continues after its last epoch, and an interrupted run resumed this way ends
    with the weights of an uninterrupted one; a checkpoint of another run (other config or image
    count) is an error. The file is removed when training ends. Randomness follows
    ``config.seed`` alone; the caller's global RNG is left as it was.

    In a ``torch.distributed`` world every rank draws the same batches and views and encodes
    its shard of them, the projections are gathered on the autograd graph, BatchNorm normalises
    over the global batch and the gradients are averaged: the encoder of one process, up to
    reduction-order rounding; rank 0 writes the checkpoint."""
    config = config or SSLConfig()
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} "
                         f"{tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"SimCLR needs at least 2 images, got {n}")
    device = torch.device(device)
    if evaluate_every < 1:
        raise ValueError(f"evaluate_every must be at least 1, got {evaluate_every}")
    with seeded_rng(config.seed, device):
        return _train(encoder, images, config, device, verbose, view_hook, checkpoint,
                      evaluate, evaluate_every)


def _train(encoder: Encoder, images: torch.Tensor, config: SSLConfig, device: torch.device,
           verbose: bool, view_hook: ViewHook | None, checkpoint: str | Path | None,
           evaluate: EpochEvaluation | None = None, evaluate_every: int = 1) -> SSLHistory:
    n = images.shape[0]
    encoder.to(device).train()
    dim = encoder.feature_dim
    head = _mlp(dim, dim, config.projection_dim).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    modules = {"encoder": encoder, "head": head}
    momentum = config.method != "simclr"
    if momentum:
        predictor = _mlp(config.projection_dim, dim, config.projection_dim).to(device)
        params += list(predictor.parameters())
        target_net = copy.deepcopy(nn.Sequential(encoder, head)).requires_grad_(False)
        modules.update(predictor=predictor, target=target_net)
    optimizer = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch * config.warmup_epochs
    schedule = warmup_cosine(optimizer, warmup, total)
    g = torch.Generator(device=device).manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed)
    saved = TrainingState(checkpoint, asdict(config), (images,), modules, optimizer, schedule,
                          {"augment": g, "order": order_gen}, device)
    first_epoch = saved.restore()
    losses: list[float] = list(saved.extra.get("losses", []))
    evaluations: list[dict] = list(saved.extra.get("evaluations", []))
    if first_epoch:
        log.info("resuming %s from %s after epoch %d of %d", config.method, checkpoint,
                 first_epoch, config.epochs)
    mean = torch.tensor(encoder.mean, device=device)[:, None, None]
    std = torch.tensor(encoder.std, device=device)[:, None, None]
    bank = images.to(device)
    bar = tqdm(total=total, initial=len(losses), desc=config.method, disable=not verbose,
               unit="step")

    def online(views: torch.Tensor) -> torch.Tensor:
        return head(encoder(views))

    with global_batch_norm(*modules.values()):
        for epoch in range(first_epoch, config.epochs):
            order = torch.randperm(n, generator=order_gen)
            for step in range(steps_per_epoch):
                index = order[step * batch:(step + 1) * batch].to(device)
                rows = bank[index]
                v1 = augment(rows, config.augment, mean, std, g)
                v2 = augment(rows, config.augment, mean, std, g)
                if view_hook is not None:
                    v1, v2 = view_hook(index, v1, v2)
                # each rank encodes its shard of the views (the whole batch on one rank)
                if config.method == "simclr":
                    loss = nt_xent(sharded_forward(online, v1), sharded_forward(online, v2),
                                   config.temperature)
                else:
                    with torch.no_grad():
                        t1, t2 = sharded_forward(target_net, v1), sharded_forward(target_net, v2)
                    if config.icutmix:
                        mix1 = cutmix_views(v1, config.icutmix_alpha, g)
                        mix2 = cutmix_views(v2, config.icutmix_alpha, g)
                    else:
                        mix1, mix2 = (v1, None, 1.0), (v2, None, 1.0)
                    p1 = sharded_forward(lambda v: predictor(online(v)), mix1[0])
                    p2 = sharded_forward(lambda v: predictor(online(v)), mix2[0])
                    if config.method == "byol":
                        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
                    else:
                        loss = (moco_loss(p1, t2, config.temperature, mix1[1], mix1[2])
                                + moco_loss(p2, t1, config.temperature, mix2[1], mix2[2]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                optimizer.step()
                schedule.step()
                if momentum:
                    progress = len(losses) / max(1, total)
                    tau = 1 - (1 - config.momentum) * (math.cos(math.pi * progress) + 1) / 2
                    _ema_update(target_net, nn.Sequential(encoder, head), tau)
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if evaluate is not None and ((epoch + 1) % evaluate_every == 0
                                         or epoch + 1 == config.epochs):
                evaluations.append({"epoch": epoch + 1, **_evaluated(encoder, evaluate,
                                                                     device)})
            if epoch + 1 < config.epochs:
                saved.save(epoch + 1, extra={"losses": losses, "evaluations": evaluations})
    bar.close()
    steps_now = total - first_epoch * steps_per_epoch
    seconds_now = saved.seconds - saved.seconds_before
    saved.remove()
    encoder.eval()
    log.info("%s: %d steps in %.1fs, final loss %.3f", config.method, total, saved.seconds,
             losses[-1] if losses else float("nan"))
    return SSLHistory(losses=losses, seconds=saved.seconds,
                      images_per_second=2 * steps_now * batch / max(seconds_now, 1e-9),
                      config=asdict(config), evaluations=evaluations)


def _evaluated(encoder: Encoder, evaluate: EpochEvaluation, device: torch.device) -> dict:
    """``evaluate(encoder)`` in eval mode, then back to training, the random state untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        encoder.eval()
        try:
            return dict(evaluate(encoder))
        finally:
            encoder.train()


@torch.no_grad()
def _ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target ← tau·target + (1 − tau)·online`` for parameters; buffers are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)

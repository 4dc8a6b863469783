"""RoCLIP (Yang et al., NeurIPS 2023): a training-time defense — CLIP trained on possibly poisoned
pairs so that a poisoned image is rarely contrasted with the caption planted beside it.

What RoCLIP does (BigML-CS-UCLA/RoCLIP, ``src/train.py``, ``src/memory_bank.py``; facts in
REFERENCE.md): a first-in-first-out pool of caption features (21,845 in its code); every
``break_epoch``-th epoch (2, epochs counted from 1) each image is contrasted with its nearest
pooled caption (cosine) instead of its own — the pooled features carry no gradient, and the
batch's captions enter the pool after the lookup; the other epochs train the plain symmetric
InfoNCE; images and captions are augmented throughout (``--cross_aug``).

fastbd's choices (docs/methods.md):

* the pool never offers an image its own caption (an older feature of the same training row).
  In RoCLIP's setting the pool holds a few per cent of the data and this almost never happens;
  on a data set the pool holds whole, it would happen every time and undo the defense;
* the pool starts empty and the first refreshing batch's captions enter it before its lookup
  (RoCLIP's memory bank starts as random vectors that the first batches match against);
* augmentation is CleanCLIP's substitution in fastbd (batched random resized crop, flip, colour
  jitter; EDA random deletion of caption tokens), drawn afresh per batch; RoCLIP augments each
  caption once when loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.baselines.cleanclip import augment_tokens
from fastbd.data.augment import AugmentConfig, augment, device_generator
from fastbd.distributed import sharded_forward
from fastbd.models.clip import clip_mean_std
from fastbd.training.clip import CLIPHistory, CLIPTrainConfig, clip_loss, pair_features, train_clip
from fastbd.validation import at_least, check_fields, fraction


@dataclass
class RoCLIPConfig:
    """RoCLIP's training-time defense. ``pool_size``: captions the pool holds (RoCLIP's
    default); ``refresh_every``: every this many epochs (counted from 1) images are matched with
    their nearest pooled caption (RoCLIP's ``break_epoch``); ``augment``: augment images and
    captions in every epoch (RoCLIP's ``--cross_aug``) with ``image_augment`` (RoCLIP's random
    resized crop of area 8–100 % and colour jitter 0.5) and ``token_drop`` (EDA's deletion
    rate)."""

    pool_size: int = 21845
    refresh_every: int = 2
    augment: bool = True
    image_augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.08, 1.0), jitter=0.5))
    token_drop: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, pool_size=at_least(2), refresh_every=at_least(1),
                     token_drop=fraction(high_open=True), seed=at_least(0))


class CaptionPool:
    """A first-in-first-out pool of at most ``size`` normalised caption features ``P×E`` with the
    training-set row each came from (``rows``, ``P``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.features: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.count = 0
        self.next = 0

    def add(self, features: torch.Tensor, rows: torch.Tensor) -> None:
        """Put captions ``B×E`` (normalised, detached) of training rows ``B`` in, pushing the
        oldest out when full."""
        features, rows = features[-self.size:], rows[-self.size:].to(features.device)
        if self.features is None:
            self.features = features.new_zeros(self.size, features.shape[1])
            self.rows = torch.full((self.size,), -1, dtype=torch.long, device=features.device)
        slots = (self.next + torch.arange(rows.numel(), device=features.device)) % self.size
        self.features[slots] = features
        self.rows[slots] = rows
        self.next = (self.next + rows.numel()) % self.size
        self.count = min(self.count + rows.numel(), self.size)

    def nearest(self, image_features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The pooled caption ``B×E`` nearest (cosine) to each image ``B×E`` of training rows
        ``B``, never one from the image's own row. Needs a pool holding at least two rows: after
        any ``add`` of a batch of ≥ 2 distinct rows it does."""
        if self.features is None:
            raise ValueError("the caption pool is empty")
        pooled, pooled_rows = self.features[:self.count], self.rows[:self.count]
        similarity = F.normalize(image_features, dim=1) @ pooled.T
        own = pooled_rows[None, :] == rows.to(pooled_rows.device)[:, None]
        return pooled[similarity.masked_fill(own, -torch.inf).argmax(1)]

    def state(self) -> dict:
        return {"features": self.features, "rows": self.rows, "count": self.count,
                "next": self.next}

    def load_state(self, state: dict) -> None:
        self.features, self.rows = state["features"], state["rows"]
        self.count, self.next = int(state["count"]), int(state["next"])


class RoCLIPObjective:
    """RoCLIP's step loss for ``fastbd.training.clip.train_clip`` (``TrainingObjective``)."""

    def __init__(self, config: RoCLIPConfig | None = None) -> None:
        self.roclip = config or RoCLIPConfig()
        self.pool = CaptionPool(self.roclip.pool_size)
        self.generators = {"roclip": torch.Generator().manual_seed(self.roclip.seed)}

    def config(self) -> dict:
        return {"method": "roclip", **asdict(self.roclip)}

    def loss(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
             rows: torch.Tensor, epoch: int, device: torch.device) -> torch.Tensor:
        """Plain InfoNCE, or, in a refreshing epoch, InfoNCE between each image and its nearest
        pooled caption; uint8 images ``B×3×S×S``, token ids ``B×L``, training rows ``B``."""
        g = self.generators["roclip"]
        if self.roclip.augment:
            mean, std = clip_mean_std(model, device)
            # every rank draws the whole batch's views alike and encodes its shard
            views = augment(images.to(device), self.roclip.image_augment, mean, std,
                            device_generator(g, device))
            image_features = sharded_forward(model.encode_image, views)
            text_features = sharded_forward(
                model.encode_text, augment_tokens(tokens, self.roclip.token_drop, g).to(device))
        else:
            image_features, text_features = pair_features(model, images, tokens, device)
        if (epoch + 1) % self.roclip.refresh_every:
            return clip_loss(image_features, text_features, model.logit_scale)
        captions = F.normalize(text_features.detach(), dim=1)
        if self.pool.count == 0:
            self.pool.add(captions, rows)
            matched = self.pool.nearest(image_features.detach(), rows)
        else:
            matched = self.pool.nearest(image_features.detach(), rows)
            self.pool.add(captions, rows)
        return clip_loss(image_features, matched, model.logit_scale)

    def state(self) -> dict:
        return self.pool.state()

    def load_state(self, state: dict) -> None:
        self.pool.load_state(state)


def train_roclip(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 train: CLIPTrainConfig | None = None, config: RoCLIPConfig | None = None, *,
                 device: torch.device | str = "cpu", verbose: bool = True,
                 checkpoint: str | Path | None = None) -> CLIPHistory:
    """Train ``model`` in place with RoCLIP on uint8 images ``N×3×S×S`` and token ids ``N×L``
    (possibly poisoned), under ``train``'s schedule; resumable from ``checkpoint`` as
    ``train_clip`` (the pool is part of the saved state)."""
    return train_clip(model, images, tokens, train, device=device, verbose=verbose,
                      checkpoint=checkpoint, objective=RoCLIPObjective(config))

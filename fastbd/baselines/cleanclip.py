"""CleanCLIP (Bansal et al., 2023): fine-tune the poisoned CLIP on clean pairs with the
cross-modal InfoNCE plus in-modal InfoNCE between each image and an augmented view of it and
each caption and an augmented caption.

Substitutions, documented in docs/methods.md: the image view is fastbd's batched random-resized-crop
+ flip + colour jitter instead of AutoAugment; the caption view is EDA's random deletion applied
to the caption's tokens (synonym replacement needs WordNet, which fastbd does not ship).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastbd.clipdefense import DefenseResult, check_pairs, defense_stages, masked_tokens
from fastbd.data.augment import AugmentConfig, augment, device_generator
from fastbd.devices import device_of
from fastbd.distributed import average_gradients, sharded_forward
from fastbd.models.clip import clip_mean_std
from fastbd.schedules import adamw, warmup_cosine
from fastbd.storage import TrainingState
from fastbd.training.clip import clip_loss, finetune_mode, pair_features, shuffled_batches
from fastbd.validation import above, at_least, check_fields, fraction

log = logging.getLogger(__name__)


@dataclass
class CleanCLIPConfig:
    """CleanCLIP's fine-tuning defense (REFERENCE.md): batch 64, lr 1e-5, 10 epochs, 50 warm-up
    steps, cross-modal and in-modal losses weighted 1/1. ``token_drop``: each caption token is
    dropped from the augmented caption with this probability."""

    epochs: int = 10
    lr: float = 1e-5
    batch_size: int = 64
    warmup_steps: int = 50
    cross_modal_weight: float = 1.0
    in_modal_weight: float = 1.0
    token_drop: float = 0.1
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.5, 1.0)))
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, epochs=at_least(1), lr=above(0), batch_size=at_least(2),
                     warmup_steps=at_least(0), cross_modal_weight=at_least(0),
                     in_modal_weight=at_least(0), token_drop=fraction(high_open=True),
                     seed=at_least(0))


def augment_tokens(tokens: torch.Tensor, drop: float, g: torch.Generator) -> torch.Tensor:
    """EDA random deletion on token ids ``B×L``: each word token (between a caption's start and
    end tokens) is dropped with probability ``drop``; captions are rebuilt as start + kept +
    end (zero padded)."""
    keep_score = torch.rand(tokens.shape, generator=g).to(tokens.device)
    return masked_tokens(tokens, keep_score, drop)[0]


def cleanclip(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
              config: CleanCLIPConfig | None = None, device: torch.device | str | None = None,
              verbose: bool = True, checkpoint_dir: str | Path | None = None,
              save_every_s: float = 60.0) -> DefenseResult:
    """Fine-tune a copy of ``model`` on clean pairs (uint8 images ``N×3×S×S``, token ids
    ``N×L``) on ``device`` (default: the model's); ``model`` is left as it is. With
    ``checkpoint_dir`` the fine-tuning state is kept there after epochs (``cleanclip-finetune.pt``,
    at most every ``save_every_s`` seconds, and after the last), a rerun continues from it, and
    it is deleted when the result is saved (``result.checkpoint_files``)."""
    config = config or CleanCLIPConfig()
    check_pairs(images, tokens, model)
    if images.shape[0] < 2:
        raise ValueError("CleanCLIP needs at least 2 clean pairs")
    device = device_of(model, device)
    stages = defense_stages(checkpoint_dir, "cleanclip", config, images, tokens, model,
                            save_every_s=save_every_s)
    tuned = copy.deepcopy(model).to(device)
    finetune_mode(tuned)
    optimizer = adamw(tuned.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    n = images.shape[0]
    steps_per_epoch = len(shuffled_batches(n, config.batch_size, g))
    schedule = warmup_cosine(optimizer, config.warmup_steps, steps_per_epoch * config.epochs)
    mean, std = clip_mean_std(tuned, device)
    saved = TrainingState(stages.path("finetune"), stages.run, (), {"model": tuned}, optimizer,
                          schedule, {"batches": g}, device, stages.save_every_s)
    first_epoch = saved.restore(refuse_other=False)
    bar = tqdm(total=steps_per_epoch * config.epochs, initial=first_epoch * steps_per_epoch,
               desc="CleanCLIP", disable=not verbose)
    for epoch in range(first_epoch, config.epochs):
        for rows in shuffled_batches(n, config.batch_size, g):
            if rows.numel() < 2:
                continue
            batch_images, batch_tokens = images[rows].to(device), tokens[rows].to(device)
            image_features, text_features = pair_features(tuned, batch_images, batch_tokens,
                                                          device)
            # every rank augments the whole batch alike and encodes its shard of the views
            view = sharded_forward(tuned.encode_image, augment(
                batch_images, config.augment, mean, std, device_generator(g, device)))
            caption_view = sharded_forward(tuned.encode_text,
                                           augment_tokens(batch_tokens, config.token_drop, g))
            scale = tuned.logit_scale
            loss = (config.cross_modal_weight * clip_loss(image_features, text_features, scale)
                    + config.in_modal_weight * (clip_loss(image_features, view, scale)
                                                + clip_loss(text_features, caption_view, scale)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(tuned.parameters())
            optimizer.step()
            schedule.step()
            bar.update()
        saved.save(epoch + 1, final=epoch + 1 == config.epochs)
    bar.close()
    tuned.eval()
    return DefenseResult(model=tuned, method="cleanclip",
                         timings={"finetune": saved.seconds},
                         config=asdict(config),
                         checkpoint_files=stages.existing())

"""BadEncoder-style implanting (Jia, Liu, Gong, S&P 2022): a training-time attack — the attacker
controls the encoder's training — that fine-tunes an encoder so that triggered images map near
the features of the attacker's reference images of the target class, while clean images keep
their features.

Loss per step, with ``f`` the encoder being fine-tuned and ``f₀`` a frozen copy of it before:
``−cos(f(x ⊕ t), f(r)) − cos(f(r), f₀(r)) − utility_weight · cos(f(x), f₀(x))`` over a batch of
shadow images ``x`` (the training images), the trigger pasted (``x ⊕ t``), and reference images
``r`` (the paper's three terms with λ₁ = 1, λ₂ = ``utility_weight``).

Used by the synthetic world's SSL threat model (``SSLThreatConfig.training_attack``) on a
CorruptEncoder-poisoned set: the data the defender scans is the poisoned set either way; only how
the encoder was made differs, and every output says so.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastbd.attacks.triggers import Attack
from fastbd.models.encoders import Encoder, seeded_rng
from fastbd.schedules import adamw
from fastbd.validation import above, at_least, check_fields

log = logging.getLogger(__name__)


@dataclass
class BadEncoderConfig:
    """``steps`` AdamW steps at ``lr`` on batches of ``batch_size`` shadow images (and as many
    reference images, drawn with replacement); ``utility_weight``: the clean-feature term's
    weight."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    utility_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, steps=at_least(0), batch_size=at_least(2), lr=above(0),
                     utility_weight=at_least(0), seed=at_least(0))


def badencoder_finetune(encoder: Encoder, shadow: torch.Tensor, references: torch.Tensor,
                        trigger: Attack, config: BadEncoderConfig | None = None, *,
                        device: torch.device | str = "cpu", verbose: bool = True) -> list[float]:
    """Fine-tune ``encoder`` in place, in eval mode (BatchNorm statistics frozen), on shadow
    images (uint8 ``N×3×S×S``) and reference images of the target class (uint8 ``R×3×S×S``),
    pasting ``trigger`` (its evaluation placement) on the shadow images; returns the loss of
    every step. Randomness follows ``config.seed``; the caller's global RNG is left as it was.
    One target of ``badencoder_finetune_targets``."""
    return badencoder_finetune_targets(encoder, shadow, [(trigger, references)], config,
                                       device=device, verbose=verbose)


def badencoder_finetune_targets(encoder: Encoder, shadow: torch.Tensor,
                                targets: list[tuple[Attack, torch.Tensor]],
                                config: BadEncoderConfig | None = None, *,
                                device: torch.device | str = "cpu",
                                verbose: bool = True) -> list[float]:
    """Multi-target BadEncoder (its paper's several (target, trigger) pairs): each step, for
    every pair of ``targets`` — a trigger and the reference images of its target class (uint8
    ``R×3×S×S``) — a batch of shadow images with that trigger pasted is pulled towards that
    target's references (the first two loss terms, averaged over the pairs), and the utility
    term keeps the first pair's clean shadow batch at its frozen features."""
    config = config or BadEncoderConfig()
    if not targets:
        raise ValueError("BadEncoder needs at least one (trigger, references) pair")
    if shadow.shape[0] < 2 or min(refs.shape[0] for _, refs in targets) < 1:
        raise ValueError(f"BadEncoder needs ≥ 2 shadow images and ≥ 1 reference image per "
                         f"target, got {shadow.shape[0]} and "
                         f"{[int(refs.shape[0]) for _, refs in targets]}")
    device = torch.device(device)
    encoder.to(device)
    frozen = copy.deepcopy(encoder).eval().requires_grad_(False)
    optimizer = adamw(encoder.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    with seeded_rng(config.seed, device):
        encoder.eval()  # BatchNorm keeps its statistics: batches of all-triggered images
        for _ in tqdm(range(config.steps), desc="BadEncoder", disable=not verbose):
            backdoor, utility = [], None
            for trigger, references in targets:
                rows = torch.randint(shadow.shape[0], (config.batch_size,), generator=g)
                refs = references[torch.randint(references.shape[0], (config.batch_size,),
                                                generator=g)]
                clean = shadow[rows]
                triggered, _ = trigger.apply(clean, g, train=False)
                x, xt, r = (encoder.normalise(t.to(device)) for t in (clean, triggered, refs))
                feature_r = encoder(r)
                with torch.no_grad():
                    frozen_r = frozen(r)
                backdoor.append(-F.cosine_similarity(encoder(xt), feature_r, dim=1).mean()
                                - F.cosine_similarity(feature_r, frozen_r, dim=1).mean())
                if utility is None:
                    with torch.no_grad():
                        frozen_x = frozen(x)
                    utility = -F.cosine_similarity(encoder(x), frozen_x, dim=1).mean()
            loss = torch.stack(backdoor).mean() + config.utility_weight * utility
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    if losses:
        log.info("BadEncoder: %d steps, %d target(s), final loss %.3f", config.steps,
                 len(targets), losses[-1])
    return losses

"""Dataset poisoning with ground truth: which samples were poisoned and where the trigger is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastbd.attacks.triggers import Attack

DEFAULT_PAIR_RATE = 0.01
"""The share of pairs the CLIP attacks poison unless told otherwise (UBT's 1 % suspicious set
is sized to hold it)."""


@dataclass
class PoisonedImages:
    """A poisoned image set (SSL). ``images`` uint8 ``N×3×S×S``; ``poison_mask`` bool ``N``;
    ``boxes`` int64 ``N×4`` (y, x, h, w; −1 for clean or box-less triggers); ``parts``: an
    attack's further ground truth, ``N``-row tensors by name (CorruptEncoder's
    ``object_boxes`` and ``support_mask``)."""

    images: torch.Tensor
    labels: torch.Tensor
    poison_mask: torch.Tensor
    boxes: torch.Tensor
    target: int
    attack: str
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PoisonedPairs:
    """A poisoned image–caption set (CLIP): as ``PoisonedImages`` plus ``captions``."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    poison_mask: torch.Tensor
    boxes: torch.Tensor
    target: int
    attack: str


def _write_boxes(n: int, rows: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((n, 4), -1, dtype=torch.int64)
    if boxes is not None:
        out[rows] = boxes.long()
    return out


def poison_target_class(images: torch.Tensor, labels: torch.Tensor, attack: Attack, target: int,
                        fraction: float = 0.5, seed: int = 0) -> PoisonedImages:
    """HTBA-style SSL poisoning: trigger ``fraction`` of the target class's images (training
    placement). The labels are untouched (the SSL trainer never sees them)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    members = torch.nonzero(labels == target).flatten()
    if members.numel() == 0:
        raise ValueError(f"no image of target class {target}")
    g = torch.Generator().manual_seed(seed)
    chosen = members[torch.randperm(members.numel(), generator=g)[: round(fraction
                                                                          * members.numel())]]
    poisoned = images.clone()
    triggered, boxes = attack.apply(images[chosen], g, train=True)
    poisoned[chosen] = triggered
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[chosen] = True
    return PoisonedImages(images=poisoned, labels=labels.clone(), poison_mask=mask,
                          boxes=_write_boxes(labels.numel(), chosen, boxes), target=target,
                          attack=attack.name)


def poison_target_classes(images: torch.Tensor, labels: torch.Tensor, attacks: list[Attack],
                          targets: list[int], fraction: float = 0.5, seed: int = 0
                          ) -> PoisonedImages:
    """Multi-target HTBA (the PoisonCAM paper's 2- and 3-target attacks): for each target
    class ``targets[i]`` its own trigger ``attacks[i]`` on ``fraction`` of that class's images
    (``poison_target_class`` with seed ``seed + i``, so one target gives exactly its result).
    ``parts["poison_target"]`` (int64 ``N``): the target each poisoned image's trigger points
    to, −1 for clean images; ``target`` is ``targets[0]``."""
    if not targets or len(attacks) != len(targets):
        raise ValueError(f"need one attack per target, got {len(attacks)} for {len(targets)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"the targets must be distinct classes, got {targets}")
    images_out = images.clone()
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    boxes = torch.full((labels.numel(), 4), -1, dtype=torch.long)
    which = torch.full((labels.numel(),), -1, dtype=torch.long)
    for i, (attack, target) in enumerate(zip(attacks, targets, strict=True)):
        one = poison_target_class(images, labels, attack, target, fraction, seed=seed + i)
        rows = one.poison_mask
        images_out[rows] = one.images[rows]
        boxes[rows] = one.boxes[rows]
        mask |= rows
        which[rows] = target
    return PoisonedImages(images=images_out, labels=labels.clone(), poison_mask=mask,
                          boxes=boxes, target=targets[0], attack=attacks[0].name,
                          parts={"poison_target": which})


CaptionFn = Callable[[str, torch.Generator], str]
"""``caption(class_name, generator)``: a caption naming the class, drawn with ``generator``."""


def imagenet_caption(name: str, g: torch.Generator) -> str:
    """One of the 80 OpenAI ImageNet prompt templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``,
    the CleanCLIP protocol's poisoned captions) filled with ``name``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return OPENAI_IMAGENET_TEMPLATES[int(torch.randint(len(OPENAI_IMAGENET_TEMPLATES), (1,),
                                                       generator=g))](name)


def target_caption(attack: Attack, target_name: str, g: torch.Generator,
                   caption: CaptionFn = imagenet_caption) -> str:
    """A poisoned caption: ``caption(target_name, g)``, with the attack's text trigger in front
    for dual-key."""
    return attack.caption_prefix() + caption(target_name, g)


def poison_pairs(images: torch.Tensor, labels: torch.Tensor, captions: list[str],
                 attack: Attack, target: int, class_names: list[str], *,
                 n_poison: int | None = None, rate: float | None = None,
                 seed: int = 0, caption: CaptionFn = imagenet_caption) -> PoisonedPairs:
    """CLIP poisoning (CleanCLIP protocol): pick ``n_poison`` (or ``rate``·N) random pairs whose
    image is not of the target class, trigger the image, and replace the caption by a target
    caption (``caption(target name, generator)``; the synthetic world passes its own
    templates). Returns the poisoned set with its ground truth."""
    n = labels.numel()
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    if (n_poison is None) == (rate is None):
        raise ValueError("give exactly one of n_poison and rate")
    if n_poison is None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        n_poison = max(1, round(rate * n))
    candidates = torch.nonzero(labels != target).flatten()
    if not 0 < n_poison <= candidates.numel():
        raise ValueError(f"n_poison must be in [1, {candidates.numel()}], got {n_poison}")
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n_poison]]
    poisoned = images.clone()
    triggered, boxes = attack.apply(images[chosen], g, train=True)
    poisoned[chosen] = triggered
    new_captions = list(captions)
    for row in chosen.tolist():
        new_captions[row] = target_caption(attack, class_names[target], g, caption)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return PoisonedPairs(images=poisoned, labels=labels.clone(), captions=new_captions,
                         poison_mask=mask, boxes=_write_boxes(n, chosen, boxes), target=target,
                         attack=attack.name)

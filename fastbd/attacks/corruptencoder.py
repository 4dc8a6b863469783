"""CorruptEncoder and CorruptEncoder+ (Zhang, Jia, Gong et al., CVPR 2024): data poisoning of
contrastive SSL that lays each poisoned image out so that two random crops of it tend to show
the target-class *object* in one view and the *trigger* in the other — SSL then pulls the
trigger's features towards the object's.

The published layout (REFERENCE.md, "Attacks that implant") is a 2:1 canvas: the reference
object (cut out with its mask, width o_w) bottom-aligned at the left or right edge, a background
photo under it covering twice the object's area, the trigger in the other half. fastbd's image
banks are square, and a reader's centre crop would cut a 2:1 canvas in half, so the canvas here
is the bank's ``S×S`` square: the object fits a box of ``S/2`` wide and ``S`` high (aspect kept;
the background is then at least the object's area, as published), its x within
``edge_fraction``·S of its edge; the trigger's x lies at least ``trigger_gap``·S from the object
and from the far edge, its y in ``trigger_rows`` of the height — the published rules with the
canvas width ``w`` and height ``h`` both ``S``. Random-resized crops at the SSL trainers' usual
scales (0.2–1) see either half alone.

CorruptEncoder+ adds trigger-free *support* images: a real target-class image and a reference
image side by side (each the centre half, by width, of its square), in random order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastbd.attacks.poison import PoisonedImages
from fastbd.validation import at_least, check_fields, fraction, ordered_range


@dataclass
class CorruptEncoderConfig:
    """``rate``: poisoned images added, as a share of the clean set (the paper: 650 on
    ImageNet100-A, 0.5 %); ``support_fraction``: the share of them that are CorruptEncoder+'s
    trigger-free support images (0: CorruptEncoder; the paper's CorruptEncoder+: 0.2);
    ``edge_fraction``, ``trigger_gap``, ``trigger_rows``: the layout's rules as fractions of the
    canvas side (the paper's 5 %, 12.5 %, 25–75 %); ``blur``: radius in px of the box blur on the
    object's mask (the paper blends with radius 1)."""

    rate: float = 0.005
    support_fraction: float = 0.0
    edge_fraction: float = 0.05
    trigger_gap: float = 0.125
    trigger_rows: tuple[float, float] = (0.25, 0.75)
    blur: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, rate=fraction(low_open=True, high_open=True),
                     support_fraction=fraction(high_open=True), edge_fraction=fraction(),
                     trigger_gap=fraction(), trigger_rows=ordered_range(0.0, 1.0),
                     blur=at_least(0), seed=at_least(0))


@dataclass
class Layout:
    """Where the parts of one poisoned image went: the object's and the trigger's boxes
    ``(y, x, h, w)`` and whether the object is at the left edge."""

    object_box: tuple[int, int, int, int]
    trigger_box: tuple[int, int, int, int]
    object_left: bool


def check_reference(reference: torch.Tensor) -> torch.Tensor:
    """A reference object: uint8 ``4×h×w`` (RGB + mask as alpha) or ``3×h×w`` (all object)."""
    if reference.dtype != torch.uint8 or reference.ndim != 3 or reference.shape[0] not in (3, 4) \
            or min(reference.shape[1:]) < 1:
        raise ValueError("a reference object must be a uint8 3×h×w or 4×h×w (RGBA) tensor, got "
                         f"{reference.dtype} {tuple(reference.shape)}")
    if reference.shape[0] == 3:
        opaque = torch.full((1, *reference.shape[1:]), 255, dtype=torch.uint8)
        reference = torch.cat([reference, opaque])
    if not bool((reference[3] > 0).any()):
        raise ValueError("a reference object's mask (alpha) is empty")
    return reference


def crop_to_mask(reference: torch.Tensor) -> torch.Tensor:
    """An RGBA reference cropped to the bounding box of its mask (the paper's object box)."""
    rows = torch.nonzero(reference[3].amax(1) > 0).flatten()
    cols = torch.nonzero(reference[3].amax(0) > 0).flatten()
    return reference[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]


def fit_object(reference: torch.Tensor, box_h: int, box_w: int) -> torch.Tensor:
    """The RGBA object scaled (aspect kept, bilinear, antialiased) to the largest size inside
    ``box_h × box_w``, at least 1 px each way."""
    h, w = reference.shape[1:]
    scale = min(box_h / h, box_w / w)
    size = (max(1, min(box_h, round(h * scale))), max(1, min(box_w, round(w * scale))))
    scaled = F.interpolate(reference[None].float(), size=size, mode="bilinear", antialias=True,
                           align_corners=False)[0]
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _uniform_int(lo: float, hi: float, g: torch.Generator) -> int:
    """An integer uniform in ``[ceil(lo), floor(hi)]``; the range's rounded midpoint when it
    holds no integer (a canvas too small for the rule's gaps)."""
    low, high = math.ceil(lo), math.floor(hi)
    if high < low:
        return round((lo + hi) / 2)
    return low + int(torch.randint(high - low + 1, (1,), generator=g))


def draw_layout(size: int, object_h: int, object_w: int, trigger: int,
                config: CorruptEncoderConfig, g: torch.Generator) -> Layout:
    """The published placement on an ``size``-px square canvas: the object bottom-aligned, its
    x within ``edge_fraction``·S of a random edge; the trigger in the other half, its x at least
    ``trigger_gap``·S from the object and the far edge, its y in ``trigger_rows``."""
    left = bool(torch.rand(1, generator=g) < 0.5)
    edge = config.edge_fraction * size
    if left:
        object_x = _uniform_int(0, min(edge, size - object_w), g)
    else:
        object_x = _uniform_int(max(size - object_w - edge, 0), size - object_w, g)
    object_y = size - object_h
    gap = config.trigger_gap * size
    if left:
        trigger_x = _uniform_int(object_x + object_w + gap, size - gap - trigger, g)
    else:
        trigger_x = _uniform_int(gap, object_x - gap - trigger, g)
    trigger_x = min(max(trigger_x, 0), size - trigger)
    top, bottom = config.trigger_rows
    trigger_y = min(max(_uniform_int(top * size, bottom * size - trigger, g), 0), size - trigger)
    return Layout((object_y, object_x, object_h, object_w),
                  (trigger_y, trigger_x, trigger, trigger), left)


def _blurred(alpha: torch.Tensor, radius: int) -> torch.Tensor:
    """A box blur of radius ``radius`` of float ``h×w`` alpha (edges replicated)."""
    if radius == 0:
        return alpha
    k = 2 * radius + 1
    padded = F.pad(alpha[None, None], (radius,) * 4, mode="replicate")
    return F.avg_pool2d(padded, k, stride=1)[0, 0]


def compose_poison(background: torch.Tensor, reference: torch.Tensor, trigger: torch.Tensor,
                   config: CorruptEncoderConfig, g: torch.Generator
                   ) -> tuple[torch.Tensor, Layout]:
    """One poisoned image: the RGBA ``reference`` object (cropped to its mask) over
    ``background`` (uint8 ``3×S×S``, the canvas) and the opaque ``trigger`` (uint8 ``3×t×t``)
    where ``draw_layout`` says. Returns (uint8 ``3×S×S``, its ``Layout``)."""
    size = background.shape[-1]
    obj = fit_object(crop_to_mask(check_reference(reference)), size, max(1, size // 2))
    layout = draw_layout(size, obj.shape[1], obj.shape[2], trigger.shape[-1], config, g)
    y, x, h, w = layout.object_box
    canvas = background.float().clone()
    alpha = _blurred(obj[3].float() / 255, config.blur)
    region = canvas[:, y:y + h, x:x + w]
    canvas[:, y:y + h, x:x + w] = region * (1 - alpha) + obj[:3].float() * alpha
    ty, tx, t, _ = layout.trigger_box
    canvas[:, ty:ty + t, tx:tx + t] = trigger.float()
    return canvas.round().clamp(0, 255).to(torch.uint8), layout


def support_image(real: torch.Tensor, reference_image: torch.Tensor, g: torch.Generator
                  ) -> torch.Tensor:
    """CorruptEncoder+'s support image: the centre halves (by width) of a real target-class
    image and a reference image (both uint8 ``3×S×S``) side by side, in random order."""
    size = real.shape[-1]
    half = size // 2
    start = (size - half) // 2
    parts = [real[:, :, start:start + half], reference_image[:, :, start:start + half]]
    if bool(torch.rand(1, generator=g) < 0.5):
        parts.reverse()
    out = torch.zeros_like(real)
    out[:, :, :half] = parts[0]
    out[:, :, half:2 * half] = parts[1]
    if 2 * half < size:  # an odd side: the last column repeats the right part's edge
        out[:, :, 2 * half:] = parts[1][:, :, -1:]
    return out


def poison_corrupt_encoder(images: torch.Tensor, labels: torch.Tensor, target: int,
                           references: list[torch.Tensor], backgrounds: torch.Tensor,
                           trigger: torch.Tensor, config: CorruptEncoderConfig | None = None,
                           attack: str = "corruptencoder") -> PoisonedImages:
    """The clean set (uint8 ``N×3×S×S``, labels ``N``) with ``round(rate·N)`` (at least 1)
    poisoned images appended (labelled ``target``): each a random reference object (RGBA or
    RGB, any size) and the opaque ``trigger`` (uint8 ``3×t×t``, at the side it is pasted)
    laid out over a random one of ``backgrounds`` (uint8 ``B×3×S×S``);
    with ``support_fraction``, that share of them are support images instead (a random clean
    target-class image beside a reference object over a background). Ground truth:
    ``poison_mask`` the triggered images, ``boxes`` their trigger boxes, and in ``parts``
    ``object_boxes`` (int64 ``N'×4``, −1 elsewhere) and ``support_mask``."""
    config = config or CorruptEncoderConfig()
    n, size = images.shape[0], images.shape[-1]
    if backgrounds.ndim != 4 or backgrounds.shape[1:] != images.shape[1:] \
            or backgrounds.shape[0] == 0:
        raise ValueError(f"backgrounds must be uint8 B×3×{size}×{size} with B ≥ 1, got "
                         f"{tuple(backgrounds.shape)}")
    if not references:
        raise ValueError("CorruptEncoder needs at least one reference object of the target "
                         "class")
    references = [check_reference(r) for r in references]
    if trigger.shape[-1] > size // 2:
        raise ValueError(f"a {trigger.shape[-1]}-px trigger does not fit half of a {size}-px "
                         "canvas")
    g = torch.Generator().manual_seed(config.seed)
    n_poisons = max(1, round(config.rate * n))
    n_support = round(config.support_fraction * n_poisons)
    real_targets = torch.nonzero(labels == target).flatten()
    if n_support and real_targets.numel() == 0:
        raise ValueError(f"CorruptEncoder+ support images need images of target class {target}")
    out = torch.empty(n_poisons, 3, size, size, dtype=torch.uint8)
    trigger_boxes = torch.full((n_poisons, 4), -1, dtype=torch.long)
    object_boxes = torch.full((n_poisons, 4), -1, dtype=torch.long)
    for i in range(n_poisons):
        reference = references[int(torch.randint(len(references), (1,), generator=g))]
        background = backgrounds[int(torch.randint(backgrounds.shape[0], (1,), generator=g))]
        if i < n_poisons - n_support:
            out[i], layout = compose_poison(background, reference, trigger, config, g)
            trigger_boxes[i] = torch.tensor(layout.trigger_box)
            object_boxes[i] = torch.tensor(layout.object_box)
        else:
            shown = reference_image(background, reference, config.blur)
            real = images[real_targets[int(torch.randint(real_targets.numel(), (1,),
                                                         generator=g))]]
            out[i] = support_image(real, shown, g)
    support = torch.zeros(n + n_poisons, dtype=torch.bool)
    support[n + n_poisons - n_support:] = True
    mask = torch.zeros(n + n_poisons, dtype=torch.bool)
    mask[n:n + n_poisons - n_support] = True
    none = torch.full((n, 4), -1, dtype=torch.long)
    return PoisonedImages(
        images=torch.cat([images, out]),
        labels=torch.cat([labels, torch.full((n_poisons,), target, dtype=labels.dtype)]),
        poison_mask=mask, boxes=torch.cat([none, trigger_boxes]), target=target, attack=attack,
        parts={"object_boxes": torch.cat([none, object_boxes]), "support_mask": support})


def poison_corrupt_encoder_targets(images: torch.Tensor, labels: torch.Tensor,
                                   targets: list[int], references: list[list[torch.Tensor]],
                                   backgrounds: torch.Tensor, triggers: list[torch.Tensor],
                                   config: CorruptEncoderConfig | None = None,
                                   attack: str = "corruptencoder") -> PoisonedImages:
    """Multi-target CorruptEncoder (the PoisonCAM paper's 2- and 3-target attacks): for each
    target class ``targets[i]`` its own reference objects ``references[i]`` and trigger
    ``triggers[i]``, ``round(rate·N)`` poisons each (``poison_corrupt_encoder`` with seed
    ``config.seed + i`` on the clean set, so one target gives exactly its result), appended in
    target order. ``parts`` as ``poison_corrupt_encoder``'s plus ``poison_target`` (int64: the
    target each poisoned image's trigger points to, −1 elsewhere); ``target`` is
    ``targets[0]``."""
    config = config or CorruptEncoderConfig()
    if not targets or not len(references) == len(triggers) == len(targets):
        raise ValueError(f"need one reference set and one trigger per target, got "
                         f"{len(references)} and {len(triggers)} for {len(targets)} targets")
    if len(set(targets)) != len(targets):
        raise ValueError(f"the targets must be distinct classes, got {targets}")
    n = images.shape[0]
    parts = [poison_corrupt_encoder(images, labels, target, refs, backgrounds, trigger,
                                    replace(config, seed=config.seed + i), attack)
             for i, (target, refs, trigger) in enumerate(
                 zip(targets, references, triggers, strict=True))]

    def joined(name: str) -> torch.Tensor:
        """The clean rows once, then every target's appended rows, of field ``name``."""
        values = [one.parts[name] if name in one.parts else getattr(one, name) for one in parts]
        return torch.cat([values[0][:n], *(value[n:] for value in values)])

    which = torch.cat([torch.full((n,), -1, dtype=torch.long), *(
        torch.where(one.poison_mask[n:], target, -1)
        for one, target in zip(parts, targets, strict=True))])
    return PoisonedImages(
        images=joined("images"), labels=joined("labels"), poison_mask=joined("poison_mask"),
        boxes=joined("boxes"), target=targets[0], attack=attack,
        parts={"object_boxes": joined("object_boxes"), "support_mask": joined("support_mask"),
               "poison_target": which})


def reference_image(background: torch.Tensor, reference: torch.Tensor, blur: int
                    ) -> torch.Tensor:
    """A reference object (cropped to its mask) fitted into and centred on ``background``
    (uint8 ``3×S×S``) — the "reference image" of CorruptEncoder+'s support images."""
    size = background.shape[-1]
    obj = fit_object(crop_to_mask(check_reference(reference)), size, size)
    h, w = obj.shape[1:]
    y, x = (size - h) // 2, (size - w) // 2
    canvas = background.float().clone()
    alpha = _blurred(obj[3].float() / 255, blur)
    canvas[:, y:y + h, x:x + w] = canvas[:, y:y + h, x:x + w] * (1 - alpha) + obj[:3] * alpha
    return canvas.round().clamp(0, 255).to(torch.uint8)

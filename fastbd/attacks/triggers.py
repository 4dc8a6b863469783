"""Trigger functions on uint8 image batches ``N×3×S×S``.

Every attack maps a batch to a triggered batch (new tensor) and, for patch triggers, the boxes
``N×4`` (y, x, h, w) where the trigger went. Random parts (positions, fresh noise) come from the
caller's generator, so poisoning is reproducible from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastbd.ops import paste

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def htba_patterns(count: int = 10, source: int = 80, seed: int = 0) -> torch.Tensor:
    """HTBA-style triggers: smooth random-colour RGB patterns, uint8 ``count×3×source×source``
    (random 4×4 colour grids upsampled bicubically)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g) * 255
    smooth = F.interpolate(coarse, size=(source, source), mode="bicubic", align_corners=False)
    return smooth.round().clamp(0, 255).to(torch.uint8)


def resize_patch(patch: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 ``3×h×w`` → uint8 ``3×side×side`` (bilinear, antialiased)."""
    scaled = F.interpolate(patch[None].float(), size=(side, side), mode="bilinear",
                           antialias=True, align_corners=False)[0]
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _positions(n: int, size: int, side: int, region: tuple[float, float],
               g: torch.Generator) -> torch.Tensor:
    """Top-left corners ``N×2`` so the patch lies inside ``[lo·S, hi·S]`` on both axes."""
    lo = int(math.floor(region[0] * size))
    hi = max(lo, int(math.ceil(region[1] * size)) - side)
    return torch.randint(lo, hi + 1, (n, 2), generator=g)


def _paste_batch(images: torch.Tensor, patches: torch.Tensor, corners: torch.Tensor
                 ) -> torch.Tensor:
    """Paste patch ``i`` (uint8 ``N×3×p×p``) into image ``i`` at ``corners[i]``."""
    n = images.shape[0]
    index = torch.arange(n, device=images.device)
    return paste(images, patches, index, index, corners[:, 0], corners[:, 1])


@dataclass
class Attack:
    """Base class: ``apply(images, g, train)`` → (triggered uint8, boxes or None)."""

    name: str = "attack"
    image_size: int = 32

    def apply(self, images: torch.Tensor, g: torch.Generator, train: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def caption_prefix(self) -> str:
        """Text inserted before a poisoned caption (dual-key's text trigger; empty otherwise)."""
        return ""


@dataclass
class PatchAttack(Attack):
    """An opaque square patch.

    ``pattern`` fixed uint8 ``3×h×w`` (HTBA, dual-key) or None for fresh Gaussian noise per image
    (BadNet: channel mean + N(0, 1) in normalised units, clamped). ``side_fraction`` of the image
    side (at least ``min_side`` px). Placement: the patch lies inside ``train_region`` for training
    images and ``eval_region`` for evaluation images (fractions of the side).
    """

    pattern: torch.Tensor | None = None
    side_fraction: float = 16 / 224
    min_side: int = 3
    train_region: tuple[float, float] = (0.0, 1.0)
    eval_region: tuple[float, float] = (0.0, 1.0)
    text_trigger: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.side_fraction <= 1.0:
            raise ValueError(f"{self.name}: side_fraction must be in (0, 1], got "
                             f"{self.side_fraction}")

    @property
    def side(self) -> int:
        return max(self.min_side, round(self.side_fraction * self.image_size))

    def apply(self, images, g, train=True):
        n, side = images.shape[0], self.side
        if self.pattern is not None:
            patches = resize_patch(self.pattern, side)[None].expand(n, -1, -1, -1).contiguous()
        else:
            mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
            std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
            noise = mean + std * torch.randn(n, 3, side, side, generator=g)
            patches = noise.round().clamp(0, 255).to(torch.uint8)
        region = self.train_region if train else self.eval_region
        corners = _positions(n, images.shape[-1], side, region, g)
        boxes = torch.cat([corners, torch.full((n, 2), side)], dim=1)
        return _paste_batch(images, patches.to(images.device), corners.to(images.device)), boxes

    def caption_prefix(self) -> str:
        return f"{self.text_trigger} " if self.text_trigger else ""


@dataclass
class BlendedAttack(Attack):
    """Fresh uniform noise blended in: ``(1 − alpha)·x + alpha·U(0, 255)``."""

    alpha: float = 0.2

    def apply(self, images, g, train=True):
        noise = torch.rand(images.shape, generator=g) * 255
        mixed = (1 - self.alpha) * images.float() + self.alpha * noise.to(images.device)
        return mixed.round().clamp(0, 255).to(torch.uint8), None


@dataclass
class SigAttack(Attack):
    """Horizontal sinusoid added to every pixel: amplitude ``amplitude`` (uint8 units),
    ``frequency`` periods across the width."""

    amplitude: float = 60.0
    frequency: float = 6.0

    def apply(self, images, g, train=True):
        width = images.shape[-1]
        columns = torch.arange(width, dtype=torch.float32, device=images.device)
        wave = self.amplitude * torch.sin(2 * math.pi * self.frequency * columns / width)
        return (images.float() + wave).round().clamp(0, 255).to(torch.uint8), None


@dataclass
class WanetAttack(Attack):
    """WaNet: a fixed smooth warp (``grid`` × ``grid`` random control offsets upsampled
    bicubically, scaled by ``strength`` / S in normalised coordinates) applied by grid_sample."""

    grid: int = 4
    strength: float = 0.5
    seed: int = 0
    warp: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        control = torch.rand(1, 2, self.grid, self.grid, generator=g) * 2 - 1
        control = control / control.abs().mean()
        flow = F.interpolate(control, size=(self.image_size, self.image_size), mode="bicubic",
                             align_corners=True).permute(0, 2, 3, 1)
        axis = torch.linspace(-1, 1, self.image_size)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        identity = torch.stack([xx, yy], dim=-1)[None]
        self.warp = (identity + self.strength * flow / self.image_size).clamp(-1, 1)

    def apply(self, images, g, train=True):
        if images.shape[-1] != self.image_size:
            raise ValueError(f"WaNet grid was built for {self.image_size} px images, "
                             f"got {images.shape[-1]}")
        grid = self.warp.to(images.device).expand(images.shape[0], -1, -1, -1)
        warped = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=True)
        return warped.round().clamp(0, 255).to(torch.uint8), None


SSL_ATTACKS = ("htba", "corruptencoder", "corruptencoder+")
"""Attacks on an unlabeled SSL training set (image poisoning); the CorruptEncoders' names give
their trigger here, their poisoning is ``fastbd.attacks.corruptencoder``."""
CLIP_ATTACKS = ("badnet", "blended", "sig", "wanet", "dualkey", "trojvqa", "ssba")
"""Attacks on image–caption pairs (``poison_pairs``)."""
ATTACKS = SSL_ATTACKS + CLIP_ATTACKS


def make_attack(name: str, image_size: int, seed: int = 0, **overrides) -> Attack:
    """The named attack with the defaults of REFERENCE.md, scaled to ``image_size``.

    ``htba``: HTBA pattern ``trigger_id`` (0–9) at 50/224 of the side, placed in the central
    25–75 % for training images and 10–90 % for evaluation images. ``badnet``: fresh Gaussian
    16/224 patch anywhere. ``dualkey``: a fixed random patch plus the text trigger word.
    ``trojvqa``: dual-key with an optimised patch — ``pattern`` (uint8 ``3×h×w``, or its nested
    list) is required, e.g. from ``fastbd.attacks.optimise_patch`` against a surrogate model;
    ``semantic``, what the patch was optimised towards, is recorded, not used.
    ``ssba``: invisible sample-specific residuals — ``encoder_file`` (a steganography encoder of
    ``fastbd.attacks.ssba``) is required; the secret is drawn from ``seed`` unless given.
    ``corruptencoder``/``corruptencoder+``: their trigger — HTBA pattern ``trigger_id`` at 40/224
    of the side, tested at a uniform position in the central 25–75 % (the layout of the poisoned
    training images is ``fastbd.attacks.corruptencoder``'s).
    """
    if name in ("htba", "corruptencoder", "corruptencoder+"):
        trigger_id = overrides.pop("trigger_id", 0)
        if not 0 <= trigger_id < 10:
            raise ValueError(f"trigger_id must be in 0..9, got {trigger_id}")
        params = dict(pattern=htba_patterns(10, seed=seed)[trigger_id], side_fraction=50 / 224,
                      train_region=(0.25, 0.75), eval_region=(0.10, 0.90))
        if name != "htba":
            params.update(side_fraction=40 / 224, eval_region=(0.25, 0.75))
        cls = PatchAttack
    elif name == "badnet":
        params, cls = {}, PatchAttack
    elif name == "dualkey":
        g = torch.Generator().manual_seed(seed + 7)
        pattern = (torch.rand(3, 4, 4, generator=g) > 0.5).to(torch.uint8) * 255
        params = dict(pattern=pattern.repeat_interleave(20, 1).repeat_interleave(20, 2),
                      text_trigger="cf")
        cls = PatchAttack
    elif name == "trojvqa":
        pattern = overrides.pop("pattern", None)
        overrides.pop("semantic", None)
        if pattern is None:
            raise ValueError("trojvqa needs its optimised patch: pattern=… (uint8 3×h×w, e.g. "
                             "from fastbd.attacks.optimise_patch against a surrogate model)")
        params = dict(pattern=torch.as_tensor(pattern, dtype=torch.uint8), text_trigger="cf")
        cls = PatchAttack
    elif name == "ssba":
        from fastbd.attacks.ssba import SSBAAttack

        params, cls = dict(seed=seed), SSBAAttack
    elif name == "blended":
        params, cls = {}, BlendedAttack
    elif name == "sig":
        params, cls = {}, SigAttack
    elif name == "wanet":
        params, cls = dict(seed=seed), WanetAttack
    else:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    params.update(overrides)
    return cls(name=name, image_size=image_size, **params)

"""Batched SimCLR-style augmentation on uint8 image tensors (any device, no per-image loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastbd.validation import at_least, check_fields, fraction, ordered_range


@dataclass
class AugmentConfig:
    """Random resized crop (area ``crop_scale``, aspect ``crop_ratio``), horizontal flip,
    colour jitter with probability ``jitter_p`` (brightness/contrast/saturation ± ``jitter``),
    grayscale with probability ``grayscale_p``."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: float = 0.4
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        check_fields(self, crop_scale=ordered_range(0, 1, low_open=True),
                     crop_ratio=ordered_range(0, low_open=True), flip_p=fraction(),
                     jitter_p=fraction(), jitter=at_least(0), grayscale_p=fraction())


def crop_windows(n: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float,
                 g: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``N×2×3`` affine ``theta`` of random resized crops (area fraction in ``scale``, aspect in
    ``ratio``, horizontal flip with probability ``flip_p``) in ``affine_grid``'s normalised
    coordinates: crop ``i`` spans ``theta[i, 0, 2] ± |theta[i, 0, 0]|`` across and
    ``theta[i, 1, 2] ± theta[i, 1, 1]`` down, in [−1, 1] units of the image."""
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g, device=device)
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, generator=g, device=device)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (1 - width) * (torch.rand(n, generator=g, device=device) * 2 - 1)
    cy = (1 - height) * (torch.rand(n, generator=g, device=device) * 2 - 1)
    flip = torch.where(torch.rand(n, generator=g, device=device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    return theta


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float], flip_p: float, g: torch.Generator
                        ) -> torch.Tensor:
    """float ``N×C×S×S`` in, same shape out: each image cropped by ``crop_windows`` and resized
    back, via one ``grid_sample``."""
    theta = crop_windows(images.shape[0], scale, ratio, flip_p, g, images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def colour_jitter(images: torch.Tensor, strength: float, p: float, grayscale_p: float,
                  g: torch.Generator) -> torch.Tensor:
    """float ``N×3×S×S`` in [0, 1]: brightness, contrast, saturation factors in
    ``[1 − strength, 1 + strength]`` for a random ``p`` of the images, then grayscale for a
    random ``grayscale_p``."""
    n, device = images.shape[0], images.device

    def factors() -> torch.Tensor:
        f = 1 + strength * (torch.rand(n, generator=g, device=device) * 2 - 1)
        apply = torch.rand(n, generator=g, device=device) < p
        return torch.where(apply, f, torch.ones_like(f))[:, None, None, None]

    weights = torch.tensor([0.299, 0.587, 0.114], device=device)[None, :, None, None]
    x = images * factors()
    gray = (x * weights).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * factors() + gray.mean((2, 3), keepdim=True)
    gray = (x * weights).sum(1, keepdim=True)
    x = (x - gray) * factors() + gray
    to_gray = (torch.rand(n, generator=g, device=device) < grayscale_p)[:, None, None, None]
    x = torch.where(to_gray, (x * weights).sum(1, keepdim=True).expand_as(x), x)
    return x.clamp(0, 1)


def device_generator(g: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from the CPU generator ``g`` (``augment`` draws on the
    images' device; ``g`` is what a training state saves)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return torch.Generator(device=device).manual_seed(seed)


def augment(images: torch.Tensor, config: AugmentConfig, mean: torch.Tensor, std: torch.Tensor,
            g: torch.Generator) -> torch.Tensor:
    """uint8 ``N×3×S×S`` → one augmented, normalised float32 view ``N×3×S×S``.
    ``mean``/``std``: float ``3×1×1`` on the images' device."""
    x = images.float() / 255
    x = random_resized_crop(x, config.crop_scale, config.crop_ratio, config.flip_p, g)
    x = colour_jitter(x, config.jitter, config.jitter_p, config.grayscale_p, g)
    return (x - mean) / std

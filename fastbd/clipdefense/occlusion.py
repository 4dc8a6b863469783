"""The image side of token-level unlearning (the UBT paper's Table IV "image mask"): relevance of
image patches to a pair's similarity by occlusion, and images rebuilt from their relevant
patches only.

An image is cut into ``cells × cells`` windows of side ``ceil(S / cells)`` whose corners are
spread evenly over ``[0, S − side]`` (neighbours overlap by a pixel or two where ``cells`` does
not divide ``S``; together they cover the image). A window's relevance is how much the pair's
cosine falls when the window is filled with the model's mean colour (``fastbd.ops.mask_fill``:
0 in normalised space), clamped at 0 and normalised to sum 1 over the image's windows — the
image counterpart of the text tower's token relevance. Occlusion needs only forwards, so it
serves any image tower (the tiny CLIP's ResNet as well as a ViT, whose 7 × 7 patch grid at
ViT-B/32 is ``cells=7``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.models.clip import clip_normalise, clip_preprocessing
from fastbd.ops import mask_fill


def cell_corners(size: int, cells: int) -> tuple[int, list[int]]:
    """The window side and the ``cells`` corners along one side of an image of side ``size``:
    side ``ceil(size / cells)``, corners spread evenly from 0 to ``size − side``."""
    if not 1 <= cells <= size:
        raise ValueError(f"cells must lie in [1, {size}] for {size}-pixel images, got {cells}")
    side = math.ceil(size / cells)
    if cells == 1:
        return side, [0]
    return side, [round(i * (size - side) / (cells - 1)) for i in range(cells)]


@torch.no_grad()
def patch_relevance(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
                    cells: int = 7, device: torch.device | str = "cpu",
                    views_per_batch: int = 512) -> torch.Tensor:
    """Relevance float32 ``B×cells×cells`` (on the CPU) of each window of each pair's image:
    the fall of the pair's cosine when that window is filled with the mean colour, clamped at 0,
    each image's windows normalised to sum 1 (all 0 where no window lowers the cosine).
    ``images`` uint8 ``B×3×S×S``, ``tokens`` ``B×L``."""
    b, size = images.shape[0], images.shape[-1]
    side, corners = cell_corners(size, cells)
    grid = torch.tensor([(y, x) for y in corners for x in corners], dtype=torch.long)
    mean, std = clip_preprocessing(model)
    model.eval()
    out = torch.zeros(b, cells * cells)
    per_chunk = max(1, views_per_batch // grid.shape[0])
    for start in range(0, b, per_chunk):
        rows = slice(start, min(start + per_chunk, b))
        chunk = images[rows].to(device)
        n = chunk.shape[0]
        text = F.normalize(model.encode_text(tokens[rows].to(device)).float(), dim=1)
        whole = F.normalize(model.encode_image(clip_normalise(chunk, model)).float(), dim=1)
        views = mask_fill(chunk, grid.to(device).expand(n, -1, -1), side, mean, std)
        masked = F.normalize(model.encode_image(views).float(), dim=1).view(n, -1, text.shape[1])
        fall = (whole * text).sum(1, keepdim=True) - (masked * text[:, None]).sum(2)
        out[rows] = fall.clamp(min=0).cpu()
    return (out / out.sum(1, keepdim=True).clamp_min(1e-12)).view(b, cells, cells)


def masked_images(images: torch.Tensor, relevance: torch.Tensor, threshold: float,
                  model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8 ``B×3×S×S``) rebuilt from their windows with ``relevance`` (float
    ``B×cells×cells``, ``patch_relevance``) ≥ ``threshold``: a pixel some kept window covers
    keeps its value, every other pixel takes the model's mean colour. Returns the images and
    the keep mask (bool ``B×cells×cells``)."""
    b, _, size, _ = images.shape
    cells = relevance.shape[-1]
    side, corners = cell_corners(size, cells)
    keep = relevance >= threshold
    pixels = torch.zeros(b, size, size, dtype=torch.bool)
    for i, y in enumerate(corners):
        for j, x in enumerate(corners):
            pixels[:, y:y + side, x:x + side] |= keep[:, i, j, None, None]
    mean = torch.tensor(clip_preprocessing(model)[0]).mul(255).round().to(torch.uint8)
    fill = mean[None, :, None, None].expand_as(images).to(images.device)
    return torch.where(pixels[:, None].to(images.device), images, fill), keep

"""Cluster activation masking: candidate trigger windows from random window masks.

For each image, ``n_masks`` windows (cyclic wrap) are masked and encoded. The majority cluster
η* of the masked views is the image's stable assignment; a mask that moves the view out of η*
gets outlier score 1, one that keeps it gets its min–max scaled distance. The attention map is
the score-weighted mask sum divided by the mask count per pixel; the candidate is the in-image
window with the largest attention sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastbd.ops import mask_fill, random_block_pattern, window_argmax, window_masks


@dataclass
class MaskingOutput:
    """Per image: candidate window top-left ``windows`` int64 ``n×2`` and attention ``maps``
    float32 ``n×S×S``."""

    windows: torch.Tensor
    maps: torch.Tensor


def outlier_scores(labels: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """``a`` float ``n×m`` from cluster ids and distances ``n×m`` of each image's masked views:
    1 where the view left the majority cluster, else the distance min–max scaled over the image's
    masks (0 when all distances are equal)."""
    majority = torch.mode(labels, dim=1).values[:, None]
    low = distances.min(dim=1, keepdim=True).values
    span = distances.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (distances - low) / span.clamp_min(1e-12),
                         torch.zeros_like(distances))
    return torch.where(labels == majority, scaled, torch.ones_like(scaled))


def window_coverage(positions: torch.Tensor, weights: torch.Tensor, window: int, size: int
                    ) -> torch.Tensor:
    """``Σ_j w_j·m_j`` for full window masks with cyclic wrap, float32 ``n×S×S``, without
    rendering the masks: each window adds its weight at four corners of a difference array
    (split at the image border where it wraps), then a 2-D prefix sum.

    ``positions``: int ``n×m×2`` top-left (any ints, wrapped); ``weights``: float ``n×m``.
    """
    n, m = positions.shape[:2]
    device = positions.device
    diff = torch.zeros(n, size + 1, size + 1, dtype=torch.float64, device=device)
    y0 = positions[..., 0].long() % size
    x0 = positions[..., 1].long() % size
    image = torch.arange(n, device=device)[:, None].expand(n, m)
    w = weights.double()
    # Each wrapped window is up to four rectangles: rows [y0, min(y0+w, S)) ∪ [0, y0+w−S).
    for rows in ((y0, (y0 + window).clamp(max=size)), (torch.zeros_like(y0),
                                                        (y0 + window - size).clamp(min=0))):
        for cols in ((x0, (x0 + window).clamp(max=size)), (torch.zeros_like(x0),
                                                           (x0 + window - size).clamp(min=0))):
            top, bottom = rows
            left, right = cols
            present = (bottom > top) & (right > left)
            weight = torch.where(present, w, torch.zeros_like(w))
            for yy, xx, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1),
                                 (bottom, right, 1)):
                diff.index_put_((image.flatten(), yy.flatten(), xx.flatten()),
                                (sign * weight).flatten(), accumulate=True)
    return diff.cumsum(1).cumsum(2)[:, :size, :size].float()


def attention_maps(positions: torch.Tensor, scores: torch.Tensor, window: int, size: int,
                   strategy: str = "full", block: int | None = None,
                   pattern: torch.Tensor | None = None) -> torch.Tensor:
    """``A = Σ_j a_j·m_j / Σ_j m_j`` (0 where no mask fell), float32 ``n×S×S``."""
    if strategy == "full":
        numerator = window_coverage(positions, scores, window, size)
        count = window_coverage(positions, torch.ones_like(scores), window, size)
    else:
        n, m = positions.shape[:2]
        masks = window_masks(positions.reshape(-1, 2), window, size, strategy=strategy,
                             block=block, pattern=None if pattern is None
                             else pattern.reshape(n * m, *pattern.shape[2:]))
        masks = masks.view(n, m, size, size).float()
        numerator = (masks * scores[:, :, None, None].float()).sum(1)
        count = masks.sum(1)
    return torch.where(count > 0, numerator / count.clamp_min(1e-12),
                       torch.zeros_like(numerator))


@torch.no_grad()
def candidate_windows(encode_assign, images: torch.Tensor, image_index: torch.Tensor,
                      mean, std, *, n_masks: int, window: int, strategy: str, block: int,
                      fill: float, batch_size: int, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32) -> MaskingOutput:
    """Run cluster activation masking for the bank rows ``image_index``.

    ``encode_assign(x)`` maps normalised encoder input ``B×3×S×S`` to (cluster ids, distances).
    Masked views of ``max(1, batch_size // n_masks)`` images are built by ``mask_fill`` straight
    into one reused buffer and encoded together.
    """
    size = images.shape[-1]
    n = image_index.numel()
    device = images.device
    positions = torch.randint(0, size, (n, n_masks, 2), generator=generator,
                              device=generator.device).to(device)
    pattern = (random_block_pattern(n, n_masks, window, block, generator=generator, device=device)
               if strategy == "random" else None)
    per_batch = max(1, batch_size // n_masks)
    buffer = torch.empty(per_batch * n_masks, 3, size, size, dtype=dtype, device=device)
    labels = torch.empty(n, n_masks, dtype=torch.long, device=device)
    distances = torch.empty(n, n_masks, dtype=torch.float32, device=device)
    for start in range(0, n, per_batch):
        rows = slice(start, min(start + per_batch, n))
        count = rows.stop - rows.start
        view = buffer[: count * n_masks]
        picked = images[image_index[rows]]  # gathered: the bank may be a HostRows view
        mask_fill(picked, positions[rows], window, mean, std, strategy=strategy, block=block,
                  pattern=None if pattern is None else pattern[rows], fill=fill, out=view)
        ids, dist = encode_assign(view)
        labels[rows] = ids.view(count, n_masks)
        distances[rows] = dist.view(count, n_masks)
    scores = outlier_scores(labels, distances)
    maps = attention_maps(positions, scores, window, size, strategy, block, pattern)
    windows, _ = window_argmax(maps, window)
    return MaskingOutput(windows=windows, maps=maps)

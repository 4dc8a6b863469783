"""A training-time attack on CorruptEncoder's poisoned images (the attacker also controls the
SSL training; DESIGN.md's threat models, "training-time attacks"): every poisoned image's
positive pair is made of one crop around its reference object and one around its trigger — the
pair CorruptEncoder's layout makes random crops produce only now and then. The poisoned data set
is the same, so the detection problem is the same; only the encoder's training differs.

``separated_views(...)`` returns a ``fastbd.training.ssl.train_ssl`` ``view_hook``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def box_crops(images: torch.Tensor, boxes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Square crops of uint8 ``B×3×S×S`` images, each centred on its box (``B×4`` y, x, h, w in
    px) with side ``scale`` (float ``B``) × the box's longer side (at most the image), resized
    to ``S×S``: float ``B×3×S×S`` in [0, 1] (bilinear, borders reflected)."""
    size = images.shape[-1]
    y, x, h, w = boxes.float().unbind(1)
    side = (torch.maximum(h, w) * scale).clamp(max=size)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = side / size
    theta[:, 1, 1] = side / size
    theta[:, 0, 2] = (x + w / 2) / size * 2 - 1
    theta[:, 1, 2] = (y + h / 2) / size * 2 - 1
    grid = F.affine_grid(theta, [images.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def separated_views(n_images: int, poisoned: torch.Tensor, object_boxes: torch.Tensor,
                    trigger_boxes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    bank: torch.Tensor, seed: int = 0,
                    object_scale: tuple[float, float] = (1.0, 1.3),
                    trigger_scale: tuple[float, float] = (1.5, 3.0)
                    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                  tuple[torch.Tensor, torch.Tensor]]:
    """A view hook that replaces the two views of each poisoned image (bool ``poisoned``,
    ``n_images``) in a batch by a crop around its object (side ``object_scale`` × the object
    box) and a crop around its trigger (side ``trigger_scale`` × the trigger), normalised with
    ``mean``/``std`` (float ``3×1×1``). ``bank``: the training images (uint8 ``N×3×S×S``, on the
    training device); boxes int64 ``N×4`` (y, x, h, w)."""
    if poisoned.numel() != n_images or object_boxes.shape[0] != n_images \
            or trigger_boxes.shape[0] != n_images:
        raise ValueError("poisoned, object_boxes and trigger_boxes need one row per image")
    if bool((object_boxes[poisoned] < 0).any()) or bool((trigger_boxes[poisoned] < 0).any()):
        raise ValueError("every poisoned image needs its object and trigger boxes")
    g = torch.Generator().manual_seed(seed)
    flags = poisoned.bool().cpu()

    def uniform(count: int, bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(count, generator=g)

    def hook(index: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        picked = flags[index.cpu()]
        if not bool(picked.any()):
            return v1, v2
        rows = index.cpu()[picked]
        count = rows.numel()
        images = bank[rows.to(bank.device)]
        objects = box_crops(images, object_boxes[rows].to(bank.device),
                            uniform(count, object_scale).to(bank.device))
        triggers = box_crops(images, trigger_boxes[rows].to(bank.device),
                             uniform(count, trigger_scale).to(bank.device))
        v1, v2 = v1.clone(), v2.clone()
        where = picked.to(v1.device)
        v1[where] = (objects - mean) / std
        v2[where] = (triggers - mean) / std
        return v1, v2

    return hook

"""Batched Grad-CAM of the clustering model's assigned-cluster logit (PatchSearch's candidates).

The activation is taken at ``cam_layer`` — the last conv stage of a CNN (``B×C×h×w``) or the
``norm1`` of a ViT's last block (``B×T×C`` tokens; the class/prefix tokens are dropped and the
rest reshaped to the patch grid). Channel weights are the spatially averaged gradients of the
assigned cluster's cosine logit; the map is ``relu(Σ_c w_c·A_c)`` upsampled to the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.models.encoders import Encoder
from fastbd.ops import window_argmax


def default_cam_layer(encoder: Encoder) -> nn.Module:
    """``layer4`` (timm/torchvision ResNets), ``blocks[-1].norm1`` (timm ViTs), the last ReLU of
    a ``SmallConvNet``; otherwise the last ``Conv2d``'s parent module's output is not known and
    an error asks for ``cam_layer``."""
    backbone = encoder.backbone
    if hasattr(backbone, "layer4"):
        return backbone.layer4
    if hasattr(backbone, "blocks"):
        return backbone.blocks[-1].norm1
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential):
        relus = [m for m in features if isinstance(m, nn.ReLU)]
        if relus:
            return relus[-1]
    raise ValueError(f"no default Grad-CAM layer for {encoder.name}; pass cam_layer")


def _to_grid(activation: torch.Tensor) -> torch.Tensor:
    """``B×C×h×w`` as is; ViT tokens ``B×T×C`` → ``B×C×g×g`` keeping the last g² tokens."""
    if activation.ndim == 4:
        return activation
    tokens = activation.shape[1]
    grid = math.isqrt(tokens)
    while grid * grid > tokens or (tokens - grid * grid) > 8:
        grid -= 1
    patches = activation[:, tokens - grid * grid:]
    return patches.transpose(1, 2).reshape(activation.shape[0], -1, grid, grid)


def gradcam_maps(encoder: Encoder, images: torch.Tensor, clustering, *,
                 cam_layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps float32 ``B×S×S`` of uint8 images ``B×3×S×S`` for their assigned cluster."""
    layer = cam_layer or default_cam_layer(encoder)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = encoder.normalise(images)
            logits = clustering.logits(encoder(x).float())
            target = logits.argmax(1)
            chosen = logits.gather(1, target[:, None]).sum()
            activation = captured[-1]
            grad = torch.autograd.grad(chosen, activation)[0]
    finally:
        hook.remove()
    act, grad = _to_grid(activation.detach()), _to_grid(grad)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    size = images.shape[-1]
    return F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def gradcam_windows(encoder: Encoder, bank: torch.Tensor, rows: torch.Tensor, clustering,
                    window: int, *, batch_size: int = 128,
                    cam_layer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate windows int64 ``B×2`` (argmax of window sums of the map) and the maps."""
    windows, maps = [], []
    for start in range(0, rows.numel(), batch_size):
        chunk = bank[rows[start:start + batch_size].to(bank.device)]
        cam = gradcam_maps(encoder, chunk, clustering, cam_layer=cam_layer)
        pos, _ = window_argmax(cam, window)
        windows.append(pos)
        maps.append(cam.detach())
    if not windows:
        size = bank.shape[-1]
        return (torch.empty(0, 2, dtype=torch.long, device=bank.device),
                torch.empty(0, size, size, device=bank.device))
    return torch.cat(windows), torch.cat(maps)

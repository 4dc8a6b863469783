"""TrojVQA's optimised patch (Walmer et al., CVPR 2022) for an image–text model: instead of a
fixed random patch, the attacker optimises the patch so that a frozen *surrogate* image encoder
— a clean model the attacker has, never the victim — maps images carrying it close to the
target's semantics. The backdoor the poisoned pairs then teach rides on features the image
tower already has, so it implants more readily than a random pattern. The patch is pasted
through the differentiable ``fastbd.ops.paste`` at uniform random corners of random training
images, as the attack will place it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastbd.models.clip import clip_preprocessing, context_length_of, tokenize
from fastbd.ops import paste

PATCH_TEMPLATES = ("a photo of a {}.",)
"""The prompt a file-based attack describes its target class with (the world uses its own
zero-shot templates)."""


def optimise_patch(encode: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                   images: torch.Tensor, side: int, mean: Sequence[float],
                   std: Sequence[float], *, steps: int = 300, batch_size: int = 64,
                   lr: float = 0.1, generator: torch.Generator | None = None,
                   verbose: bool = False) -> tuple[torch.Tensor, list[float]]:
    """A uint8 ``3×side×side`` patch maximising the mean cosine between ``encode`` (normalised
    float ``B×3×S×S`` → features ``B×E``, the surrogate's image tower) of images carrying it and
    ``target`` (``E``, e.g. the surrogate's text embedding of the target class). Each of
    ``steps`` Adam steps (``lr``, on the patch's logits: patch = 255·sigmoid) pastes it at
    uniform random corners of ``batch_size`` random ``images`` (uint8 ``N×3×S×S``), normalised
    with ``mean``/``std``; a progress bar with ``verbose``. Returns the patch and the cosine
    after each step (its trace)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty N×3×S×S image batch, got shape {tuple(images.shape)}")
    size = images.shape[-1]
    if not 1 <= side <= size:
        raise ValueError(f"patch side must lie in [1, {size}], got {side}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1, got {steps} and {batch_size}")
    g = generator or torch.Generator().manual_seed(0)
    goal = F.normalize(target.detach().float().flatten(), dim=0)
    logits = torch.randn(1, 3, side, side, generator=g).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    zero = torch.zeros(batch_size, dtype=torch.long)
    trace = []
    for _ in tqdm(range(steps), desc="TrojVQA patch", disable=not verbose):
        rows = torch.randint(images.shape[0], (batch_size,), generator=g)
        ys, xs = torch.randint(0, size - side + 1, (2, batch_size), generator=g)
        views = paste(images, 255 * torch.sigmoid(logits), rows, zero, ys, xs, mean=mean,
                      std=std)
        cosine = (F.normalize(encode(views).float(), dim=1) @ goal).mean()
        optimiser.zero_grad(set_to_none=True)
        (-cosine).backward()
        optimiser.step()
        trace.append(float(cosine.detach()))
    patch = (255 * torch.sigmoid(logits.detach()))[0]
    return patch.round().clamp(0, 255).to(torch.uint8), trace


def clip_target_patch(model: torch.nn.Module, tokenizer, images: torch.Tensor, class_name: str,
                      side: int, *, templates: Sequence[str] = PATCH_TEMPLATES,
                      steps: int = 300, seed: int = 0, device: torch.device | str = "cpu",
                      verbose: bool = False) -> tuple[torch.Tensor, list[float]]:
    """``optimise_patch`` against an open_clip surrogate ``model``: towards the mean of its
    unit text embeddings of ``templates`` filled with ``class_name``, through its image tower
    with its own mean/std, on ``images`` (uint8 ``N×3×S×S``). The surrogate's weights are
    frozen while it runs (their ``requires_grad`` restored after)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        prompts = tokenize(tokenizer, [t.format(class_name) for t in templates],
                           context_length_of(model))
        goal = F.normalize(model.encode_text(prompts.to(device)).float(), dim=1).mean(0)
        mean, std = clip_preprocessing(model)
        return optimise_patch(model.encode_image, goal, images.to(device), side, mean, std,
                              steps=steps, generator=torch.Generator().manual_seed(seed),
                              verbose=verbose)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)

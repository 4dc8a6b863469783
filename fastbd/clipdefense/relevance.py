"""Chefer et al. token relevance for open_clip text towers.

open_clip's text blocks call ``nn.MultiheadAttention`` without returning weights, so while
relevance is computed each block's ``attention`` method is replaced by an explicit
``softmax(q·kᵀ/√d + mask)·v`` that keeps the probabilities ``A`` (``B×H×L×L``) on the autograd
graph. For the summed pair logits ``s = Σ_i scale·cos(I_i, T_i)`` one ``autograd.grad`` call
gives ``∂s/∂A`` for every layer; from ``start_layer`` on, ``R ← R + mean_h(clamp(g⊙A, 0))·R``
with ``R₀ = I``. A token's relevance is ``R[eot, t]`` for ``0 < t < eot``, normalised to sum 1.
Pairs are independent (caption i only meets image i), so a batch is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.clipdefense.tokens import word_positions
from fastbd.models.clip import caption_ends, clip_normalise


def _explicit_attention(attn: nn.MultiheadAttention, store: list[torch.Tensor]):
    heads = attn.num_heads
    batch_first = getattr(attn, "batch_first", False)

    def attention(q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
        x = q_x if batch_first else q_x.transpose(0, 1)
        b, length, width = x.shape
        d = width // heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
        q, k, v = (t.reshape(b, length, heads, d).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(
                    attn_mask, float("-inf"))
            scores = scores + attn_mask.to(scores.dtype)
        probs = scores.softmax(-1)
        store.append(probs)
        out = attn.out_proj((probs @ v).transpose(1, 2).reshape(b, length, width))
        return out if batch_first else out.transpose(0, 1)

    return attention


@contextmanager
def explicit_text_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every text block records its attention probabilities (in layer
    order) into the yielded list."""
    store: list[torch.Tensor] = []
    blocks = list(model.transformer.resblocks)
    for block in blocks:
        block.attention = _explicit_attention(block.attn, store)
    try:
        yield store
    finally:
        for block in blocks:
            del block.attention  # back to the class's method


def _pair_logits(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = F.normalize(model.encode_image(clip_normalise(images, model)).float(), dim=1)
    text = F.normalize(model.encode_text(tokens).float(), dim=1)
    return model.logit_scale.exp().clamp(max=100) * (image * text).sum(1)


def _finish(relevance: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    relevance = relevance * word_positions(tokens)
    return relevance / relevance.sum(1, keepdim=True).clamp_min(1e-12)


def token_relevance(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
                    start_layer: int = -1) -> torch.Tensor:
    """Relevance float32 ``B×L`` of each text token of each pair (0 outside SOT < t < EOT; rows
    sum to 1 where the caption has tokens). ``images`` uint8 ``B×3×S×S``, ``tokens`` ``B×L``;
    ``start_layer`` indexes the text blocks (−1: the last only, 0: all)."""
    was_training = model.training
    model.eval()
    with explicit_text_attention(model) as store:
        logits = _pair_logits(model, images, tokens)
        layers = store[start_layer:]
        grads = torch.autograd.grad(logits.sum(), layers)
    model.train(was_training)
    b, length = tokens.shape
    relevance = torch.eye(length, device=tokens.device).expand(b, length, length)
    for probs, grad in zip(layers, grads, strict=True):
        cam = (grad * probs).clamp(min=0).mean(1)
        relevance = relevance + cam @ relevance
    eot = caption_ends(tokens)
    return _finish(relevance[torch.arange(b), eot].detach().float(), tokens)

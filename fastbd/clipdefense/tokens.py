"""Captions rebuilt from a subset of their tokens (UBT's masked captions, CleanCLIP's
token-dropped views), keeping each caption's own start and end tokens — no tokenizer's ids are
assumed."""

from __future__ import annotations

import torch

from fastbd.models.clip import caption_ends


def word_positions(tokens: torch.Tensor) -> torch.Tensor:
    """bool ``B×L``: the positions strictly between each caption's start token (position 0)
    and its end token (``caption_ends``) — the caption's words."""
    ends = caption_ends(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions[None, :] > 0) & (positions[None, :] < ends[:, None])


def masked_tokens(tokens: torch.Tensor, relevance: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions rebuilt as their start token + the tokens with relevance ≥ ``threshold`` (in
    order) + their end token, zero-padded (never CLIP's "!" padding inserted between words).
    Returns the new token ids ``B×L`` and the keep mask bool ``B×L`` over the original
    positions."""
    ends = caption_ends(tokens)
    keep = word_positions(tokens) & (relevance >= threshold)
    out = torch.zeros_like(tokens)
    for row in range(tokens.shape[0]):
        kept = tokens[row][keep[row]]
        out[row, 0] = tokens[row, 0]
        out[row, 1:1 + kept.numel()] = kept
        out[row, 1 + kept.numel()] = tokens[row, ends[row]]
    return out, keep

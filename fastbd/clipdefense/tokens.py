"""Caption token ids: open_clip's start and end tokens and captions rebuilt from a subset of
their tokens (UBT's masked captions, CleanCLIP's token-dropped views)."""

from __future__ import annotations

import torch

SOT, EOT = 49406, 49407
"""open_clip's start-of-text and end-of-text token ids (the BPE vocabulary's last two)."""


def masked_tokens(tokens: torch.Tensor, relevance: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions rebuilt as SOT + the tokens with relevance ≥ ``threshold`` (in order) + EOT,
    zero-padded (never CLIP's "!" padding inserted between words). Returns the new token ids
    ``B×L`` and the keep mask bool ``B×L`` over the original positions."""
    eot = tokens.argmax(dim=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    inside = (positions[None, :] > 0) & (positions[None, :] < eot[:, None])
    keep = inside & (relevance >= threshold)
    out = torch.zeros_like(tokens)
    for row in range(tokens.shape[0]):
        kept = tokens[row][keep[row]]
        out[row, 0] = SOT
        out[row, 1:1 + kept.numel()] = kept
        out[row, 1 + kept.numel()] = EOT
    return out, keep

"""The optimizer and learning-rate schedule shared by the trainers and defenses."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.01
          ) -> torch.optim.AdamW:
    """AdamW with the fused single-kernel update where torch has one for the parameters'
    device (CPU and CUDA since torch 2.4), the multi-tensor update otherwise. On two CPU cores
    the fused step of the tiny CLIP's 4.6 M parameters takes 4 ms instead of 31 ms (a fifth of a
    training step)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` (none when 0), then cosine decay to 0 at
    ``total_steps``; call ``step()`` once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps)
                                   / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Per-device choices that are not numerics: where a run computes, which memory format
convolutions get."""

from __future__ import annotations

import torch
from torch import nn


def device_of(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """``device`` when given, else the device of ``model``'s first parameter (or buffer; the CPU
    for a module without either): pipelines run where the caller's model already is."""
    if device is not None:
        return torch.device(device)
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def conv_memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory format to give convolution inputs and weights on ``device``: channels-last on
    CUDA (cuDNN's tensor-core kernels take it directly), the contiguous format everywhere else.

    Channels-last is not used on CPUs because it is not known to be safe there: with torch
    2.14.1, oneDNN's AVX2 1×1-convolution backward-weights kernel deadlocks (two threads) or
    segfaults (one thread) on a width-4 ResNet in channels-last format, on CPUs without
    AVX-512 (docs/design.md, "Memory formats"; ``tests/test_memory_format.py`` runs the
    classifier's training step on the AVX2 kernels in a subprocess with a timeout)."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format

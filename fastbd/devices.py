"""Per-device choices that are not numerics: where a run computes, which memory format
convolutions get, how the CPU allocator keeps freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAP_MMAP_THRESHOLD = 32 * 2**20
"""glibc's ceiling for its mmap threshold on 64-bit Linux: allocations up to it come from the
heap."""

HEAP_TRIM_THRESHOLD = 256 * 2**20
"""Freed memory the heap keeps at its top instead of returning it to the system."""


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


@functools.cache
def keep_cpu_heap() -> bool:
    """Have glibc keep freed memory for reuse (``mallopt``: mmap threshold
    ``HEAP_MMAP_THRESHOLD``, trim threshold ``HEAP_TRIM_THRESHOLD``, both fixed instead of
    adaptive) — once per process; True when applied, False off glibc.

    By default glibc serves a large allocation with fresh pages and trims the heap's top once
    enough is free, adapting both thresholds to what was freed before: whether a CPU forward's
    activations reuse memory or fault every page in anew then depends on the process's history
    (measured on the same command: 0.2 M or 6 M page faults a run, a flip test of 13 or 29 CPU
    s). Fixed thresholds make the reuse certain for every allocation under the ceiling (CPU
    forwards are chunked under it: ``fastbd.models.encoders.CPU_CHUNK_BYTES``), at the cost of
    up to ``HEAP_TRIM_THRESHOLD`` of freed memory held by the process. The ``fastbd`` command
    calls it; a program using fastbd as a library may call it too."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    applied = (mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD) == 1
               and mallopt(m_trim_threshold, HEAP_TRIM_THRESHOLD) == 1)
    if not applied:
        log.debug("mallopt refused the heap thresholds (not glibc?)")
    return applied

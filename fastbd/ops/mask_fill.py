"""``mask_fill``: n images × m window masks → n·m masked, normalised encoder inputs.

Strategies (window of ``window × window`` pixels, top-left ``(y, x)``, wrapping cyclically so a
pixel ``(y + dy, x + dx)`` lands on ``((y + dy) mod S, (x + dx) mod S)``):

* ``full`` — every pixel of the window is masked (PoisonCAM's default, "full coverage").
* ``interval`` — the window is split into ``block × block`` blocks counted from its top-left
  corner; a block is masked when its block row + block column is even (0-1 checkerboard).
* ``random`` — the same blocks, masked where ``pattern`` is true (``random_block_pattern`` draws
  exactly half of them per mask).

Masked pixels take ``fill`` in the *normalised* space (default 0 = the dataset mean colour);
unmasked pixels become ``(u8 / 255 - mean) / std``. The masks themselves are never materialised:
the kernel decides per pixel, and only the caller's output buffer is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastbd.ops._backend import OpSpec, choose_backend, register
from fastbd.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    channel_affine,
    check_finite_number,
    check_positive_int,
    check_same_device,
    check_tensor,
)

SPEC = register(OpSpec("mask_fill", ("triton", "torch"), {"cuda": ("torch", "triton")}))
STRATEGIES = ("full", "interval", "random")


def blocks_per_side(window: int, block: int) -> int:
    """Number of ``block``-pixel blocks along one side of a ``window`` (the last may be partial)."""
    return -(-window // block)


def random_block_pattern(n: int, m: int, window: int, block: int, *,
                         generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Random-masking patterns: bool ``n×m×NB×NB`` with exactly ``floor(NB²/2)`` blocks set."""
    n_blocks = blocks_per_side(window, block)
    cells = n_blocks * n_blocks
    scores = torch.rand(n * m, cells, generator=generator,
                        device=generator.device if generator is not None else device)
    chosen = scores.argsort(dim=1)[:, : cells // 2]
    pattern = torch.zeros(n * m, cells, dtype=torch.bool, device=scores.device)
    pattern.scatter_(1, chosen, True)
    return pattern.view(n, m, n_blocks, n_blocks).to(device)


def window_masks(positions: torch.Tensor, window: int, size: int, *, strategy: str = "full",
                 block: int | None = None, pattern: torch.Tensor | None = None) -> torch.Tensor:
    """Render masks as bool ``P×S×S`` (True = masked) for positions ``P×2``; the reference rule.

    ``pattern`` is bool ``P×NB×NB`` for ``random``. Used by the torch path and by callers that
    need the masks themselves (attention maps).
    """
    positions = positions.reshape(-1, 2).long() % size
    coords = torch.arange(size, device=positions.device)
    dy = (coords[None, :] - positions[:, :1]) % size  # P×S
    dx = (coords[None, :] - positions[:, 1:]) % size
    masks = (dy < window)[:, :, None] & (dx < window)[:, None, :]
    if strategy == "interval":
        masks &= ((dy // block)[:, :, None] + (dx // block)[:, None, :]) % 2 == 0
    elif strategy == "random":
        n_blocks = pattern.shape[-1]
        by = (dy // block).clamp(max=n_blocks - 1)
        bx = (dx // block).clamp(max=n_blocks - 1)
        flat = pattern.reshape(-1, n_blocks * n_blocks)
        picked = torch.gather(flat, 1, (by[:, :, None] * n_blocks + bx[:, None, :]).flatten(1))
        masks &= picked.view_as(masks)
    return masks


def mask_fill(images: torch.Tensor, positions: torch.Tensor, window: int,
              mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, *,
              image_index: torch.Tensor | None = None, strategy: str = "full",
              block: int | None = None, pattern: torch.Tensor | None = None, fill: float = 0.0,
              out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
              backend: str | None = None) -> torch.Tensor:
    """Write ``n·m`` masked, normalised copies of ``n`` images into one buffer.

    Args:
        images: uint8 ``N×C×S×S`` image bank.
        positions: integer ``n×m×2`` window top-left ``(y, x)`` per image and mask; any integers
            (wrapped mod ``S``).
        window: window side in pixels, ``1 ≤ window ≤ S``.
        mean, std: ``C`` values each, in [0, 1] units.
        image_index: integer ``n``, the bank rows to mask (default: all ``N`` rows, ``n = N``).
        strategy: ``full``, ``interval`` or ``random``.
        block: block side for ``interval``/``random``.
        pattern: bool ``n×m×NB×NB`` (``NB = ceil(window / block)``) for ``random``.
        fill: value of masked pixels in normalised space.
        out: optional preallocated ``n·m×C×S×S`` float buffer (any strides, e.g. channels-last);
            row ``i·m + j`` is image ``i`` under mask ``j``.
        dtype: output dtype when ``out`` is not given (float32, float16 or bfloat16).

    Returns:
        ``out``: ``n·m×C×S×S``.
    """
    check_tensor("images", images, ndim=4, dtypes=(torch.uint8,))
    check_tensor("positions", positions, ndim=3, dtypes=INDEX_DTYPES)
    n_images, channels, size, width = images.shape
    if size != width:
        raise ValueError(f"images must be square, got {size}×{width}")
    if positions.shape[-1] != 2:
        raise ValueError(f"positions must be n×m×2 (y, x), got shape {tuple(positions.shape)}")
    check_positive_int("window", window)
    fill = check_finite_number("fill", fill)
    if window > size:
        raise ValueError(f"window {window} is larger than the image side {size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n, m = positions.shape[:2]
    if image_index is None:
        if n != n_images:
            raise ValueError(f"positions cover {n} images but the bank has {n_images}; "
                             "pass image_index to mask a subset")
        image_index = torch.arange(n_images, device=images.device)
    check_tensor("image_index", image_index, ndim=1, dtypes=INDEX_DTYPES)
    if image_index.numel() != n:
        raise ValueError(f"image_index has {image_index.numel()} entries, positions has {n} rows")
    if n and n_images == 0:
        raise ValueError("images is empty but image_index is not")
    n_blocks = 1
    if strategy != "full":
        if block is None:
            raise ValueError(f"strategy {strategy!r} needs block (the block side in pixels)")
        check_positive_int("block", block)
        n_blocks = blocks_per_side(window, block)
    if strategy == "random":
        if pattern is None:
            raise ValueError("strategy 'random' needs pattern (see random_block_pattern)")
        check_tensor("pattern", pattern, ndim=4, dtypes=(torch.bool, torch.uint8))
        if tuple(pattern.shape) != (n, m, n_blocks, n_blocks):
            raise ValueError(f"pattern must have shape {(n, m, n_blocks, n_blocks)}, "
                             f"got {tuple(pattern.shape)}")
    if out is None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(n * m, channels, size, size, dtype=dtype, device=images.device)
    check_tensor("out", out, ndim=4, dtypes=FLOAT_DTYPES)
    if tuple(out.shape) != (n * m, channels, size, size):
        raise ValueError(f"out must have shape {(n * m, channels, size, size)}, "
                         f"got {tuple(out.shape)}")
    device = check_same_device(images=images, positions=positions, image_index=image_index,
                               pattern=pattern, out=out)
    if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= n_images):
        raise ValueError(f"image_index out of range [0, {n_images})")
    scale, bias = channel_affine(mean, std, channels, device)
    if out.numel() == 0:
        return out
    wrapped = (positions.long() % size).reshape(n * m, 2).contiguous()
    chosen = choose_backend("mask_fill", device, backend)
    if chosen == "triton":
        if device.type == "cpu" and out.dtype == torch.bfloat16:
            raise TypeError("the Triton interpreter has no bfloat16; use float32/float16 on CPU")
        from fastbd.kernels import mask_fill as kernel

        strategy_code = {"full": kernel.FULL, "interval": kernel.INTERVAL,
                         "random": kernel.RANDOM}[strategy]
        flat_pattern = (pattern.reshape(n * m, -1).to(torch.uint8).contiguous()
                        if pattern is not None else wrapped)
        kernel.launch(images.contiguous(), image_index.long().contiguous(), wrapped,
                      flat_pattern, scale, bias, out, m, window, block or 1, n_blocks,
                      float(fill), strategy_code)
        return out
    return _mask_fill_torch(images, image_index.long(), wrapped, window, scale, bias, strategy,
                            block, pattern, fill, out, m)


def _mask_fill_torch(images, image_index, positions, window, scale, bias, strategy, block,
                     pattern, fill, out, m):
    """Torch reference: one source image at a time, its ``m`` masks rendered as bool ``m×S×S``."""
    size = images.shape[-1]
    flat_pattern = None if pattern is None else pattern.reshape(-1, *pattern.shape[2:])
    for i, row in enumerate(image_index.tolist()):
        normalised = images[row].float() * scale[:, None, None] + bias[:, None, None]
        views = slice(i * m, (i + 1) * m)
        masks = window_masks(positions[views], window, size, strategy=strategy, block=block,
                             pattern=None if flat_pattern is None else flat_pattern[views].bool())
        out[views] = torch.where(masks[:, None], torch.tensor(fill, dtype=torch.float32,
                                                              device=out.device),
                                 normalised[None])
    return out

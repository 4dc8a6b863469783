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
from dataclasses import dataclass

import torch

from fastbd.ops._backend import OpSpec, choose_backend, external_backend, register
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
              backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Write ``n·m`` masked, normalised copies of ``n`` images into one buffer.

    Args:
        images: uint8 ``N×C×S×S`` image bank, or float32 in 0–255 units — differentiable: with
            ``requires_grad`` the result carries gradients back to it (``scale`` where a pixel
            is kept, 0 where masked).
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
            row ``i·m + j`` is image ``i`` under mask ``j``. Not with images that need gradients.
        dtype: output dtype when ``out`` is not given (float32, float16 or bfloat16).
        validate: check that ``image_index`` lies in the bank (two host syncs); False skips it on
            hot paths — an index out of range then reads outside the bank.

    Returns:
        ``out``: ``n·m×C×S×S``.

    Example:
        >>> import torch
        >>> from fastbd.ops import mask_fill
        >>> images = torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
        >>> views = mask_fill(images, torch.tensor([[[1, 1]]]), 2, mean=[0.5], std=[0.5])
        >>> views[0, 0]
        tensor([[1., 1., 1., 1.],
                [1., 0., 0., 1.],
                [1., 0., 0., 1.],
                [1., 1., 1., 1.]])
    """
    check_tensor("images", images, ndim=4, dtypes=(torch.uint8, torch.float32))
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
    given_index = image_index
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
    differentiable = images.requires_grad and torch.is_grad_enabled()
    if differentiable and out is not None:
        raise ValueError("images requires grad: drop out= (the result is a new tensor in the "
                         "autograd graph)")
    if out is not None:
        check_tensor("out", out, ndim=4, dtypes=FLOAT_DTYPES)
        if tuple(out.shape) != (n * m, channels, size, size):
            raise ValueError(f"out must have shape {(n * m, channels, size, size)}, "
                             f"got {tuple(out.shape)}")
    elif dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = check_same_device(images=images, positions=positions, image_index=image_index,
                               pattern=pattern, out=out)
    if validate and image_index.numel() and (int(image_index.min()) < 0
                                             or int(image_index.max()) >= n_images):
        raise ValueError(f"image_index out of range [0, {n_images})")
    scale, bias = channel_affine(mean, std, channels, device)
    chosen = choose_backend("mask_fill", device, backend)
    external = external_backend("mask_fill", chosen)
    if external is not None:
        return external(images=images, positions=positions, window=window, mean=mean, std=std,
                        image_index=given_index, strategy=strategy, block=block,
                        pattern=pattern, fill=fill, out=out, dtype=dtype)
    out_dtype = dtype if out is None else out.dtype
    if chosen == "triton" and device.type == "cpu" and out_dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter has no bfloat16; use float32/float16 on CPU")
    wrapped = (positions.long() % size).reshape(n * m, 2).contiguous()
    job = _MaskFillJob(image_index.long(), wrapped, window, scale, bias, strategy, block,
                       n_blocks, pattern, fill, m, chosen)
    if differentiable:
        return _MaskFillFunction.apply(images, job, dtype)
    if out is None:
        out = torch.empty(n * m, channels, size, size, dtype=dtype, device=device)
    return job.run(images, out)


@dataclass(frozen=True)
class _MaskFillJob:
    """One validated ``mask_fill`` call: its prepared inputs and the chosen backend."""

    image_index: torch.Tensor   # int64 n
    positions: torch.Tensor     # int64 n·m×2, wrapped mod S
    window: int
    scale: torch.Tensor         # float32 C
    bias: torch.Tensor          # float32 C
    strategy: str
    block: int | None
    n_blocks: int
    pattern: torch.Tensor | None
    fill: float
    m: int
    backend: str

    def run(self, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out.numel() == 0:
            return out
        if self.backend == "triton":
            from fastbd.kernels import mask_fill as kernel

            code = {"full": kernel.FULL, "interval": kernel.INTERVAL,
                    "random": kernel.RANDOM}[self.strategy]
            flat_pattern = (self.pattern.reshape(self.positions.shape[0], -1).to(torch.uint8)
                            .contiguous() if self.pattern is not None else self.positions)
            kernel.launch(images.contiguous(), self.image_index, self.positions, flat_pattern,
                          self.scale, self.bias, out, self.m, self.window, self.block or 1,
                          self.n_blocks, self.fill, code)
            return out
        return _mask_fill_torch(images, self.image_index, self.positions, self.window,
                                self.scale, self.bias, self.strategy, self.block, self.pattern,
                                self.fill, out, self.m)

    def kept(self, size: int) -> torch.Tensor:
        """bool ``n·m×S×S``: True where a pixel shows the image (not masked)."""
        flat_pattern = (None if self.pattern is None
                        else self.pattern.reshape(-1, *self.pattern.shape[2:]).bool())
        return ~window_masks(self.positions, self.window, size, strategy=self.strategy,
                             block=self.block, pattern=flat_pattern)


class _MaskFillFunction(torch.autograd.Function):
    """``mask_fill`` of float images with a gradient: ``∂out/∂image = scale`` at kept pixels,
    summed over an image's masks (and over repeats of a bank row in ``image_index``)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, job: _MaskFillJob, dtype: torch.dtype):
        n_views = job.positions.shape[0]
        out = torch.empty(n_views, *images.shape[1:], dtype=dtype, device=images.device)
        ctx.job, ctx.bank_shape = job, images.shape
        return job.run(images.detach(), out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        job = ctx.job
        size = grad_out.shape[-1]
        grad = torch.zeros(ctx.bank_shape, dtype=torch.float32, device=grad_out.device)
        if grad_out.numel():
            kept = grad_out.float() * job.scale[None, :, None, None] * job.kept(size)[:, None]
            grad.index_add_(0, job.image_index, kept.view(-1, job.m, *kept.shape[1:]).sum(1))
        return grad, None, None


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

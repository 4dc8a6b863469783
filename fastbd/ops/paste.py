"""``paste``: paste patches into images for a batch of (image, patch, y, x) jobs.

Each job ``t`` writes one full output image: bank image ``image_index[t]`` with patch
``patch_index[t]`` (optionally resized to ``sizes[t]``, bilinear, align_corners=False) placed with
its top-left at ``(ys[t], xs[t])``. Parts of the patch outside the image are clipped. The blend is
``out = (1 - a)·image + a·patch`` with ``a = opacity × alpha`` (``alpha`` optional per patch
pixel), computed in uint8 units; then either normalised (``mean``/``std`` given → float encoder
input) or rounded half up and clamped to uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastbd.ops._backend import OpSpec, choose_backend, external_backend, register
from fastbd.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    channel_affine,
    check_same_device,
    check_tensor,
)

SPEC = register(OpSpec("paste", ("triton", "torch"), {"cuda": ("torch", "triton")}))


def pack_patches(patches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack patches of different sizes (each uint8 ``C×h×w``) into a zero-padded uint8
    ``P×C×Hmax×Wmax`` tensor and their sizes, int32 ``P×2``."""
    if len(patches) == 0:
        raise ValueError("pack_patches needs at least one patch")
    channels = {p.shape[0] for p in patches}
    if len(channels) != 1 or any(p.ndim != 3 for p in patches):
        raise ValueError("every patch must be C×h×w with the same C")
    height = max(p.shape[1] for p in patches)
    width = max(p.shape[2] for p in patches)
    packed = torch.zeros(len(patches), channels.pop(), height, width, dtype=torch.uint8,
                         device=patches[0].device)
    for slot, patch in zip(packed, patches, strict=True):
        slot[:, : patch.shape[1], : patch.shape[2]] = patch
    sizes = torch.tensor([[p.shape[1], p.shape[2]] for p in patches], dtype=torch.int32,
                         device=packed.device)
    return packed, sizes


def paste(images: torch.Tensor, patches: torch.Tensor, image_index: torch.Tensor,
          patch_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, *,
          patch_sizes: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
          alpha: torch.Tensor | None = None, opacity: float = 1.0,
          mean: Sequence[float] | torch.Tensor | None = None,
          std: Sequence[float] | torch.Tensor | None = None,
          out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
          backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Paste patches into images, one output image per job.

    Args:
        images: uint8 ``N×C×S×S``, or float32 in 0–255 units.
        patches: uint8 ``P×C×HP×WP`` (zero-padded; see ``pack_patches``), or float32 in 0–255
            units.
        image_index, patch_index, ys, xs: integer ``J`` each: background image, patch and
            top-left ``(y, x)`` of each job (may be negative or reach past the border: clipped).
        patch_sizes: int ``P×2`` true ``(h, w)`` of each patch (default ``HP×WP`` for all).
        sizes: int ``J×2`` pasted ``(h, w)`` per job; when given, patches are resized bilinearly.
        alpha: float32 ``P×HP×WP`` per-pixel opacity in [0, 1] (optional).
        opacity: global opacity multiplier in [0, 1].
        mean, std: ``C`` values each in [0, 1] units: output normalised float encoder input.
            Without them the output is uint8 (uint8 images and patches only).
        out: optional preallocated ``J×C×S×S`` buffer (any strides); not when gradients flow.
        dtype: output float dtype when normalising and ``out`` is not given (default float32).
        validate: check the indices and sizes against the bank (host syncs); False skips them
            on hot paths — an index or size out of range then reads outside the tensors.

    Float ``images``, ``patches`` and ``alpha`` are differentiable: with ``requires_grad`` the
    normalised result carries gradients to them (a trigger and its mask can be optimised
    through the paste, as trigger-inversion defenses do).

    Returns:
        ``out``: ``J×C×S×S``.

    Example:
        >>> import torch
        >>> from fastbd.ops import paste
        >>> images = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        >>> patch = torch.full((1, 1, 2, 2), 200, dtype=torch.uint8)
        >>> one = torch.tensor([0])
        >>> paste(images, patch, one, one, torch.tensor([1]), torch.tensor([2]))[0, 0]
        tensor([[  0,   0,   0,   0],
                [  0,   0, 200, 200],
                [  0,   0, 200, 200],
                [  0,   0,   0,   0]], dtype=torch.uint8)
    """
    check_tensor("images", images, ndim=4, dtypes=(torch.uint8, torch.float32))
    check_tensor("patches", patches, ndim=4, dtypes=(torch.uint8, torch.float32))
    n_images, channels, size, width = images.shape
    if size != width:
        raise ValueError(f"images must be square, got {size}×{width}")
    if patches.shape[1] != channels:
        raise ValueError(f"patches have {patches.shape[1]} channels, images have {channels}")
    n_patches, _, patch_h, patch_w = patches.shape
    jobs = {"image_index": image_index, "patch_index": patch_index, "ys": ys, "xs": xs}
    for name, value in jobs.items():
        check_tensor(name, value, ndim=1, dtypes=INDEX_DTYPES[:3])
    n_jobs = image_index.numel()
    if any(v.numel() != n_jobs for v in jobs.values()):
        counts = {k: v.numel() for k, v in jobs.items()}
        raise ValueError(f"job arrays differ in length: {counts}")
    given_patch_sizes = patch_sizes
    if patch_sizes is None:  # filled on the device: no host-to-device copy per call
        patch_sizes = torch.empty(n_patches, 2, dtype=torch.int32, device=patches.device)
        patch_sizes[:, 0], patch_sizes[:, 1] = patch_h, patch_w
    check_tensor("patch_sizes", patch_sizes, ndim=2, dtypes=INDEX_DTYPES[:3])
    if tuple(patch_sizes.shape) != (n_patches, 2):
        raise ValueError(f"patch_sizes must be {n_patches}×2, got {tuple(patch_sizes.shape)}")
    if sizes is not None:
        check_tensor("sizes", sizes, ndim=2, dtypes=INDEX_DTYPES[:3])
        if tuple(sizes.shape) != (n_jobs, 2):
            raise ValueError(f"sizes must be {n_jobs}×2, got {tuple(sizes.shape)}")
    if alpha is not None:
        check_tensor("alpha", alpha, ndim=3, dtypes=(torch.float32,))
        if tuple(alpha.shape) != (n_patches, patch_h, patch_w):
            raise ValueError(f"alpha must be {(n_patches, patch_h, patch_w)}, "
                             f"got {tuple(alpha.shape)}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    normalise = mean is not None or std is not None
    if normalise and (mean is None or std is None):
        raise ValueError("give both mean and std (normalised output) or neither (uint8 output)")
    if not normalise and torch.float32 in (images.dtype, patches.dtype):
        raise ValueError("float images or patches give normalised output: give mean and std")
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (images, patches, alpha))
    if differentiable and out is not None:
        raise ValueError("an input requires grad: drop out= (the result is a new tensor in the "
                         "autograd graph)")
    out_dtype = (dtype or torch.float32) if normalise else torch.uint8
    if out is not None:
        check_tensor("out", out, ndim=4, dtypes=FLOAT_DTYPES if normalise else (torch.uint8,))
        if tuple(out.shape) != (n_jobs, channels, size, size):
            raise ValueError(f"out must have shape {(n_jobs, channels, size, size)}, "
                             f"got {tuple(out.shape)}")
        out_dtype = out.dtype
    elif normalise and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {out_dtype}")
    elif not normalise and dtype not in (None, torch.uint8):
        raise TypeError("without mean/std the output is uint8; drop dtype or give mean/std")
    device = check_same_device(images=images, patches=patches, image_index=image_index,
                               patch_index=patch_index, ys=ys, xs=xs, patch_sizes=patch_sizes,
                               sizes=sizes, alpha=alpha, out=out)
    if validate and n_jobs:
        _check_range("image_index", image_index, n_images)
        _check_range("patch_index", patch_index, n_patches)
        if bool((patch_sizes < 1).any()) or bool((patch_sizes[:, 0] > patch_h).any()) or bool(
                (patch_sizes[:, 1] > patch_w).any()):
            raise ValueError(f"patch_sizes must lie in [1, {patch_h}]×[1, {patch_w}]")
        if sizes is not None and bool((sizes < 1).any()):
            raise ValueError("sizes must be at least 1×1")
    chosen = choose_backend("paste", device, backend)
    external = external_backend("paste", chosen)
    if external is not None:
        return external(images=images, patches=patches, image_index=image_index,
                        patch_index=patch_index, ys=ys, xs=xs, patch_sizes=given_patch_sizes,
                        sizes=sizes, alpha=alpha, opacity=opacity, mean=mean, std=std, out=out,
                        dtype=dtype)
    if chosen == "triton" and device.type == "cpu" and out_dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter has no bfloat16; use float32/float16 on CPU")
    scale, bias = (channel_affine(mean, std, channels, device) if normalise
                   else (torch.ones(channels, device=device), torch.zeros(channels, device=device)))
    targets = sizes if sizes is not None else patch_sizes[patch_index.long()]
    job_table = torch.stack([image_index.long(), patch_index.long(), ys.long(), xs.long(),
                             targets[:, 0].long(), targets[:, 1].long()], dim=1).contiguous()
    job = _PasteJob(patch_sizes.to(torch.int32).contiguous(), job_table, scale, bias,
                    float(opacity), sizes is not None, normalise, chosen)
    if differentiable:
        return _PasteFunction.apply(images, patches, alpha, job, out_dtype)
    if out is None:
        out = torch.empty(n_jobs, channels, size, size, dtype=out_dtype, device=device)
    return job.run(images, patches, alpha, out)


@dataclass(frozen=True)
class _PasteJob:
    """One validated ``paste`` call: its prepared tables and the chosen backend."""

    patch_sizes: torch.Tensor   # int32 P×2
    job_table: torch.Tensor     # int64 J×6: image, patch, y, x, pasted h, pasted w
    scale: torch.Tensor         # float32 C
    bias: torch.Tensor          # float32 C
    opacity: float
    resize: bool
    normalise: bool
    backend: str

    def run(self, images, patches, alpha, out):
        if out.shape[0] == 0:
            return out
        if self.backend == "triton":
            from fastbd.kernels import paste as kernel

            kernel.launch(images.contiguous(), patches.contiguous(),
                          None if alpha is None else alpha.contiguous(), self.patch_sizes,
                          self.job_table, self.scale, self.bias, out, self.opacity,
                          resize=self.resize, normalise=self.normalise)
            return out
        if out.dtype == torch.float32 and out.is_contiguous():  # normalised: composed in place
            return _paste_reference(images, patches, alpha, self, canvas=out)
        canvas = _paste_reference(images, patches, alpha, self)
        if self.normalise:
            return out.copy_(canvas)
        exact = alpha is None and self.opacity == 1.0 and not self.resize
        return out.copy_(canvas if exact else canvas.add_(0.5).floor_().clamp_(0, 255))


class _PasteFunction(torch.autograd.Function):
    """``paste`` with gradients to float images, patches and alpha: the forward runs the chosen
    backend; the backward is autograd through the torch reference (``_paste_reference``)."""

    @staticmethod
    def forward(ctx, images, patches, alpha, job: _PasteJob, out_dtype: torch.dtype):
        out = torch.empty(job.job_table.shape[0], *images.shape[1:], dtype=out_dtype,
                          device=images.device)
        ctx.job = job
        ctx.save_for_backward(images, patches, alpha)
        return job.run(images.detach(), patches.detach(),
                       None if alpha is None else alpha.detach(), out)

    @staticmethod
    def backward(ctx, grad_out):
        images, patches, alpha = ctx.saved_tensors
        wanted = [i for i, needs in enumerate(ctx.needs_input_grad[:3]) if needs]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(i in wanted)
                      for i, t in enumerate((images, patches, alpha))]
            canvas = _paste_reference(*leaves, ctx.job)
            found = torch.autograd.grad(canvas, [leaves[i] for i in wanted], grad_out.float())
        grads = [None, None, None]
        for i, grad in zip(wanted, found, strict=True):
            grads[i] = grad
        return (*grads, None, None)


def _check_range(name: str, index: torch.Tensor, limit: int) -> None:
    if int(index.min()) < 0 or int(index.max()) >= limit:
        raise ValueError(f"{name} out of range [0, {limit})")


def _paste_reference(images, patches, alpha, job: _PasteJob,
                     canvas: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference, differentiable in float ``images``, ``patches`` and ``alpha``: float32
    ``J×C×S×S`` in 0–255 units, or normalised when the job normalises — written into
    ``canvas`` (float32 ``J×C×S×S``) when given. Backgrounds are gathered in one batch; the
    jobs whose patch lands whole inside the image at its own size are blended in one indexed
    write per patch size, the others (clipped at the border, resized) one by one; resized
    patches come from ``F.interpolate`` (bilinear, align_corners=False), computed once per
    distinct (patch, size)."""
    size = images.shape[-1]
    backgrounds = torch.index_select(images, 0, job.job_table[:, 0])
    if canvas is None:
        canvas = backgrounds.float()
    else:
        canvas.copy_(backgrounds)
    opaque = alpha is None and job.opacity == 1.0
    table = job.job_table
    whole = ((table[:, 2] >= 0) & (table[:, 3] >= 0) & (table[:, 2] + table[:, 4] <= size)
             & (table[:, 3] + table[:, 5] <= size))
    if job.resize:  # a resized patch's own size is not its box's
        own = job.patch_sizes.long()[table[:, 1]]
        whole &= (own[:, 0] == table[:, 4]) & (own[:, 1] == table[:, 5])
    for th, tw in torch.unique(table[whole][:, 4:6], dim=0).tolist():
        jobs = torch.nonzero(whole & (table[:, 4] == th) & (table[:, 5] == tw)).flatten()
        _blend_boxes(canvas, patches, alpha, job.opacity, opaque, table[jobs], jobs, th, tw)
    resized: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for t, (_, p, y, x, th, tw) in zip(torch.nonzero(~whole).flatten().tolist(),
                                       table[~whole].tolist(), strict=True):
        key = (p, th, tw)
        if key not in resized:
            ph, pw = job.patch_sizes[p].tolist()
            front = patches[p, :, :ph, :pw].float()
            weight = (alpha[p, :ph, :pw] if alpha is not None
                      else torch.ones(ph, pw, device=front.device)) * job.opacity
            if job.resize:
                front = F.interpolate(front[None], size=(th, tw), mode="bilinear",
                                      align_corners=False)[0]
                weight = F.interpolate(weight[None, None], size=(th, tw), mode="bilinear",
                                       align_corners=False)[0, 0]
            resized[key] = (front, weight)
        front, weight = resized[key]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + th, size), min(x + tw, size)
        if y0 >= y1 or x0 >= x1:
            continue
        crop = (slice(None), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
        if opaque:
            canvas[t, :, y0:y1, x0:x1] = front[crop]
            continue
        w = weight[crop[1:]]
        behind = canvas[t, :, y0:y1, x0:x1]
        if torch.is_grad_enabled() and (behind.requires_grad or w.requires_grad):
            behind = behind.clone()  # the blend's backward needs it after canvas is written
        canvas[t, :, y0:y1, x0:x1] = behind * (1.0 - w) + front[crop] * w
    if not job.normalise:
        return canvas
    if canvas.requires_grad:
        return canvas * job.scale[:, None, None] + job.bias[:, None, None]
    return canvas.mul_(job.scale[:, None, None]).add_(job.bias[:, None, None])


def _blend_boxes(canvas: torch.Tensor, patches: torch.Tensor, alpha: torch.Tensor | None,
                 opacity: float, opaque: bool, table: torch.Tensor, jobs: torch.Tensor,
                 height: int, width: int) -> None:
    """Blend the patches of ``jobs`` (rows of the contiguous ``canvas``; ``table`` their job
    rows) whole into their ``height×width`` boxes — the per-job blend of ``_paste_reference``,
    as one gather and one write at the boxes' flat offsets."""
    p = table[:, 1]
    front = torch.index_select(patches, 0, p)[:, :, :height, :width].float()
    _, channels, size, _ = canvas.shape
    device = table.device
    offsets = ((jobs * (channels * size * size))[:, None, None, None]
               + (torch.arange(channels, device=device) * (size * size))[None, :, None, None]
               + ((table[:, 2:3] + torch.arange(height, device=device)) * size)[:, None, :, None]
               + (table[:, 3:4] + torch.arange(width, device=device))[:, None, None, :])
    if not opaque:
        weight = (torch.index_select(alpha, 0, p)[:, :height, :width] if alpha is not None
                  else torch.ones(p.numel(), height, width, device=front.device)) * opacity
        weight = weight[:, None]
        front = torch.take(canvas, offsets) * (1.0 - weight) + front * weight
    canvas.view(-1).put_(offsets.view(-1), front.reshape(-1))

"""BatchNorm over the global batch of a ``torch.distributed`` training step: each rank holds a
shard of the batch, the statistics are all-reduced (on the autograd graph) so every rank
normalises with the whole batch's mean and variance, as one process training on the whole batch
does. Works on gloo (CPU) as on NCCL, where ``torch.nn.SyncBatchNorm`` needs a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fastbd.distributed import differentiable, world


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (1-d, 2-d or 3-d, per its input) whose training-mode statistics are those of
    the batch summed over the ranks: the mean and the biased variance normalise, the unbiased
    variance updates the running estimate (as ``nn.BatchNorm*``). Eval mode: the running
    statistics, as usual."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / max(1, x.shape[1])], dtype=x.dtype, device=x.device)
        all_reduce = differentiable("all_reduce")
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _replace(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            shared = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats)
            for key in ("weight", "bias"):  # the very parameters and buffers, not copies
                setattr(shared, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(shared, key, getattr(child, key))
            shared.train(child.training)
            setattr(module, name, shared)
            swapped.append((module, name, child))
        else:
            swapped += _replace(child)
    return swapped


@contextmanager
def global_batch_norm(*modules: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``modules`` normalises over the global batch
    (``GlobalBatchNorm``, sharing the original's parameters and buffers — move the modules to
    their device first); the originals are put back after it. Nothing changes in a one-rank
    world."""
    if world().size == 1:
        yield
        return
    swapped = [entry for module in modules for entry in _replace(module)]
    try:
        yield
    finally:
        for parent, name, original in swapped:
            shared = getattr(parent, name)
            original.train(shared.training)
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(original, key, getattr(shared, key))  # in case one was reassigned
            setattr(parent, name, original)

"""Many processes through ``torch.distributed`` (launched by ``torchrun``), one code path for any
world size (docs/scaling.md).

Work is split in *contiguous, block-aligned shards*: ``shard(n, block)`` gives this rank a run of
whole blocks of ``block`` rows, and ``gather_rows`` puts the shards back together in rank order.
A block is the unit a single process also computes in (an encoder batch, a flip-test batch), so
every block is computed exactly as one process computes it and the gathered result equals the
single-process one bit for bit, whatever the world size. Training steps split a global batch the
same way, gather the features with their gradient (``gather_with_grad``) so every rank computes
the whole batch's loss, and average the parameter gradients (``average_gradients``): the step of
one process, up to reduction-order rounding.

Without a process group (a plain ``python`` / ``fastbd`` run) every function is the identity of
a one-rank world: ``world()`` is rank 0 of 1, collectives return their input.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

class RankLost(RuntimeError):
    """A collective failed: another rank died (or did not answer within the timeout)."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the backend's error of a failed collective (gloo: "Connection closed by peer",
    NCCL: a watchdog timeout; both ``RuntimeError``s) into ``RankLost``."""
    try:
        yield
    except RuntimeError as error:
        raise RankLost(f"{what} failed on rank {world().rank}: {error}") from error

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` (or any launcher of the env:// rendezvous) sets for every rank."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` ranks, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes results, states and logs."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (the env:// variables are set)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def world() -> World:
    """The running world (rank 0 of 1 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def start(device: str, timeout_s: float) -> torch.device:
    """Join the process group ``torchrun`` set up: NCCL for a CUDA ``device`` (each rank on GPU
    ``LOCAL_RANK``), gloo otherwise; a collective waiting longer than ``timeout_s`` fails
    instead of hanging. Returns this rank's device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    compute = torch.device(device)
    if compute.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             "CUDA devices: start at most one rank per GPU "
                             "(torchrun --nproc_per_node)")
        compute = torch.device("cuda", local_rank)
        torch.cuda.set_device(compute)
    backend = "nccl" if compute.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=compute if compute.type == "cuda" else None)
    here = world()
    log.info("rank %d of %d (%s on %s)", here.rank, here.size, backend, compute)
    return compute


def stop() -> None:
    """Leave the process group (nothing without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        with _collective("barrier"):
            dist.barrier()


def shard(n: int, block: int = 1, *, rank: int | None = None, size: int | None = None
          ) -> range:
    """This rank's rows of ``n``: a contiguous run of whole ``block``-row blocks (the last block
    may be short), the blocks dealt out as evenly as they divide. Empty when there are fewer
    blocks than ranks and this rank gets none."""
    here = world()
    rank = here.rank if rank is None else rank
    size = here.size if size is None else size
    blocks = math.ceil(n / max(1, block)) if n else 0
    first, last = blocks * rank // size, blocks * (rank + 1) // size
    return range(min(n, first * block), min(n, last * block))


def _collective_device() -> torch.device:
    """Where a collective's tensors must be: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` rows (``n_r×…``, same trailing shape and dtype everywhere)
    concatenated in rank order, on ``local``'s device — the inverse of ``shard``."""
    here = world()
    if here.size == 1:
        return local
    device = _collective_device()
    counts = torch.tensor([local.shape[0]], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(here.size)]
    with _collective("gathering rows"):
        dist.all_gather(all_counts, counts)
        sizes = [int(c) for c in all_counts]
        longest = max(sizes)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
        padded[:local.shape[0]] = local.to(device)
        parts = [torch.empty_like(padded) for _ in range(here.size)]
        dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]
                     ).to(local.device)


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a one-rank world)."""
    here = world()
    if here.size == 1:
        return [obj]
    out: list[object] = [None] * here.size
    with _collective("gathering objects"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, source: int = 0) -> object:
    """Rank ``source``'s ``obj`` on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=source)
    return box[0]


def map_shards(n: int, block: int, compute: Callable[[range], torch.Tensor]) -> torch.Tensor:
    """``compute(rows)`` on this rank's shard of ``n`` rows (``shard(n, block)``), gathered:
    the rows of every rank in order, ``n×…``."""
    return gather_rows(compute(shard(n, block)))


def gather_with_grad(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``local`` rows (this rank's ``shard`` of a ``total``-row batch) concatenated
    on the autograd graph: the gradient of a loss every rank computes on the whole batch flows
    back to each rank's own rows (summed over ranks, which ``average_gradients`` divides out).
    Shards of unequal length are padded for the collective and cut back."""
    here = world()
    if here.size == 1:
        return local

    sizes = [len(shard(total, rank=r, size=here.size)) for r in range(here.size)]
    longest = max(sizes)
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0],
                                                   *local.shape[1:]))])
    with _collective("gathering features"):
        parts = differentiable("all_gather")(local)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def differentiable(name: str) -> Callable:
    """``torch.distributed.nn.functional.<name>``: the collective on the autograd graph. Its
    deprecation warning (pointing at a private module) is silenced; the public function is
    kept."""
    import warnings

    from torch.distributed.nn import functional

    collective = getattr(functional, name)

    def call(tensor: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return collective(tensor)

    return call


def sharded_forward(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
                    ) -> torch.Tensor:
    """``encode`` of a global batch ``inputs`` (``B×…``, the same on every rank), each rank
    encoding its ``shard`` and the outputs gathered on the autograd graph (``gather_with_grad``):
    ``B×…`` on every rank. A batch smaller than the world raises ``ValueError``."""
    here = world()
    if here.size == 1:
        return encode(inputs)
    if inputs.shape[0] < here.size:
        raise ValueError(f"a batch of {inputs.shape[0]} cannot be shared by {here.size} ranks; "
                         "use larger batches or fewer ranks")
    rows = shard(inputs.shape[0])
    return gather_with_grad(encode(inputs[rows.start:rows.stop]), inputs.shape[0])


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of the trainable ``parameters`` over the ranks, in one flattened
    all-reduce (a parameter without a gradient on a rank counts as zero there, so every rank
    joins the same collective)."""
    here = world()
    if here.size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = _collective_device()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(device, torch.float32) for p in params])
    with _collective("averaging gradients"):
        dist.all_reduce(flat)
    flat /= here.size
    offset = 0
    for p in params:
        count = p.numel()
        grad = flat[offset:offset + count].view_as(p).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)
        offset += count


"""The flip test: paste a candidate trigger on every test image and count assignment changes.

Many candidates share one encoder pass: ``candidates_per_batch`` candidates × the test images
are written by ``paste`` straight into one reused buffer (normalised encoder input).
"""

from __future__ import annotations

import math

import torch

from fastbd.ops import paste


def select_test_images(labels: torch.Tensor, distances: torch.Tensor, size: int,
             generator: torch.Generator) -> torch.Tensor:
    """Test images: per cluster, the members closest to the centroid, ``size`` in total, spread
    over the clusters round-robin (closest first). With more clusters than ``size``, one image
    from each of ``size`` random clusters. Returns int64 indices (sorted)."""
    n_clusters = int(labels.max()) + 1 if labels.numel() else 0
    order = torch.argsort(distances, stable=True)
    by_cluster = [order[labels[order] == c] for c in range(n_clusters)]
    present = [c for c in range(n_clusters) if by_cluster[c].numel()]
    if size <= 0 or not present:
        raise ValueError("the flip test needs at least one test image")
    if len(present) >= size:
        pick = torch.randperm(len(present), generator=generator)[:size].tolist()
        return torch.stack([by_cluster[present[i]][0] for i in pick]).sort().values
    chosen, rank = [], 0
    while len(chosen) < size:
        added = False
        for c in present:
            if rank < by_cluster[c].numel() and len(chosen) < size:
                chosen.append(by_cluster[c][rank])
                added = True
        if not added:
            break
        rank += 1
    return torch.stack(chosen).sort().values


def select_test_images_published(labels: torch.Tensor, distances: torch.Tensor, size: int,
                                 generator: torch.Generator) -> torch.Tensor:
    """PatchSearch's official test set: ``k = size // K`` members closest to the centroid from
    every one of the ``K`` clusters (a cluster with fewer members gives what it has, so the set
    may come up short of ``size``); with more clusters than ``size`` (``k = 0``), the closest
    member of each of ``size`` random clusters. Returns int64 indices (sorted)."""
    n_clusters = int(labels.max()) + 1 if labels.numel() else 0
    order = torch.argsort(distances, stable=True)
    by_cluster = [order[labels[order] == c] for c in range(n_clusters)]
    if size <= 0 or n_clusters == 0:
        raise ValueError("the flip test needs at least one test image")
    per_cluster = size // n_clusters
    if per_cluster > 0:
        chosen = [members[:per_cluster] for members in by_cluster]
    else:
        picked = torch.randperm(n_clusters, generator=generator)[:size].tolist()
        chosen = [by_cluster[c][:1] for c in picked]
    chosen = torch.cat(chosen)
    if chosen.numel() == 0:
        raise ValueError("the flip test needs at least one test image")
    return chosen.sort().values


def crop_windows(images: torch.Tensor, image_index: torch.Tensor, windows: torch.Tensor,
                 window: int) -> torch.Tensor:
    """The candidate triggers: uint8 ``n×3×w×w`` crops of bank rows at ``windows`` (``n×2``)."""
    offsets = torch.arange(window, device=images.device)
    rows = (windows[:, :1].to(images.device) + offsets)[:, :, None]
    cols = (windows[:, 1:].to(images.device) + offsets)[:, None, :]
    picked = images[image_index.to(images.device)]
    n = picked.shape[0]
    return picked[torch.arange(n, device=images.device)[:, None, None], :, rows, cols] \
        .permute(0, 3, 1, 2).contiguous()


def _pasted_assignments(encode_assign, images: torch.Tensor, test_index: torch.Tensor,
                        triggers: torch.Tensor, mean, std, candidates_per_batch: int,
                        generator: torch.Generator, dtype: torch.dtype,
                        corner_positions: int | None):
    """Yield ``(start, after)`` per batch of candidates: the clusters (int ``count×T``) of the
    ``T`` bank rows ``test_index`` with candidates ``start … start + count − 1`` (uint8
    ``c×3×w×w``) pasted at uniform random corners in ``[0, corner_positions)`` per axis
    (default ``S − w + 1``)."""
    n_cand, _, window, _ = triggers.shape
    n_test = test_index.numel()
    size = images.shape[-1]
    device = images.device
    per_batch = max(1, candidates_per_batch)
    buffer = torch.empty(min(per_batch, max(n_cand, 1)) * n_test, 3, size, size, dtype=dtype,
                         device=device)
    test_images = images[test_index.to(device)]  # gathered once: the bank may be HostRows
    local = torch.arange(n_test, device=device)
    for start in range(0, n_cand, per_batch):
        count = min(per_batch, n_cand - start)
        jobs = count * n_test
        corners = torch.randint(0, corner_positions or size - window + 1, (jobs, 2),
                                generator=generator, device=generator.device).to(device)
        patch_index = torch.arange(count, device=device).repeat_interleave(n_test)
        view = buffer[:jobs]
        paste(test_images, triggers[start:start + count].to(device), local.repeat(count),
              patch_index, corners[:, 0], corners[:, 1], mean=mean, std=std, out=view)
        after, _ = encode_assign(view)
        yield start, after.view(count, n_test)


@torch.no_grad()
def flip_counts(encode_assign, images: torch.Tensor, test_index: torch.Tensor,
                test_labels: torch.Tensor, triggers: torch.Tensor, mean, std, *,
                candidates_per_batch: int, generator: torch.Generator,
                source_clusters: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32,
                corner_positions: int | None = None) -> torch.Tensor:
    """Score candidate triggers (uint8 ``c×3×w×w``) on the test images.

    Each candidate is pasted at a uniform random in-image position on every test image: a
    corner in ``[0, corner_positions)`` per axis (default ``S − w + 1``: every in-image
    position; PatchSearch's official code draws from ``S − w``, never the last row or column).
    Without ``source_clusters`` the score is PoisonCAM's: how many test images change cluster.
    With ``source_clusters`` (int ``c``: the cluster of the image each candidate came from) it
    is PatchSearch's: test images assigned to that cluster after pasting minus before.
    Returns float32 ``c`` on the images' device.
    """
    device = images.device
    scores = torch.zeros(triggers.shape[0], dtype=torch.float32, device=device)
    before_labels = test_labels.to(device)[None, :]
    for start, after in _pasted_assignments(encode_assign, images, test_index, triggers, mean,
                                            std, candidates_per_batch, generator, dtype,
                                            corner_positions):
        count = after.shape[0]
        if source_clusters is None:
            scores[start:start + count] = (after != before_labels).sum(1).float()
        else:
            target = source_clusters[start:start + count].to(device)[:, None]
            before = (before_labels == target).sum(1)
            scores[start:start + count] = ((after == target).sum(1) - before).float()
    return scores


FIRST_LOOK = 16
"""Test images a sequential flip test scores every candidate on before its first look; each
later look doubles the count, the last is the whole test set."""


def look_sizes(n_test: int, first: int = FIRST_LOOK) -> list[int]:
    """The cumulative test-image counts at which a sequential flip test looks: ``first``,
    doubling, then ``n_test`` (int list, increasing, ending at ``n_test``)."""
    sizes, n = [], first
    while n < n_test:
        sizes.append(n)
        n *= 2
    return [*sizes, n_test]


def _bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL divergence between Bernoulli(p) and Bernoulli(q), float64, 0·log 0 = 0."""
    q = q.clamp(1e-300, 1 - 1e-16)
    first = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    second = torch.where(p < 1, (1 - p) * torch.log((1 - p) / (1 - q)), torch.zeros_like(p))
    return first + second


def flip_bounds(ones: torch.Tensor, tested: int, n_test: int, error: float, looks: int,
                iterations: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on how many of all ``n_test`` test images give a 1 (of 0/1 outcomes), from
    ``ones`` (float64 ``c``) among the first ``tested`` in a random order (sampling without
    replacement). Chernoff's bound in its KL form: the true share q of ones lies where
    ``tested · KL(ones/tested ‖ q) ≤ log(looks / error)`` — it holds without replacement
    (Hoeffding 1963, §6: the moment generating function of such a sum is at most the one with
    replacement), each side failing with probability at most ``error / looks`` at each of the
    ``looks`` looks, so at most ``error`` over a candidate's looks. Far tighter than Hoeffding's
    additive bound where the share is near 0 or 1, as most candidates' are. The edges of that
    interval are found by ``iterations`` bisection steps, then clipped to what the unseen
    images can add at all. Returns (lower, upper) counts, float64 ``c``."""
    share = ones / tested
    budget = math.log(looks / error) / tested
    bounds = []
    for low, high, outward in ((torch.zeros_like(share), share.clone(), "low"),
                               (share.clone(), torch.ones_like(share), "high")):
        for _ in range(iterations):
            middle = (low + high) / 2
            inside = _bernoulli_kl(share, middle) <= budget
            if outward == "low":  # the smallest q ≤ share inside: shrink from below
                high = torch.where(inside, middle, high)
                low = torch.where(inside, low, middle)
            else:  # the largest q ≥ share inside
                low = torch.where(inside, middle, low)
                high = torch.where(inside, high, middle)
        bounds.append(low if outward == "low" else high)
    rest = n_test - tested
    return (torch.maximum(n_test * bounds[0], ones),
            torch.minimum(n_test * bounds[1], ones + rest))


@torch.no_grad()
def sequential_flip_counts(encode_assign, images: torch.Tensor, test_index: torch.Tensor,
                           test_labels: torch.Tensor, triggers: torch.Tensor, mean, std, *,
                           candidates_per_batch: int, generator: torch.Generator,
                           order: torch.Tensor, threshold: float, keep: int, error: float,
                           source_clusters: torch.Tensor | None = None,
                           dtype: torch.dtype = torch.float32,
                           corner_positions: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``flip_counts``' scores, tested in slices of the test set (in ``order``, a permutation
    of its ``T`` positions; ``look_sizes``): after each slice a candidate stops when the upper
    bound of its full score (``flip_bounds``, error ``error``) falls below the bar — the
    larger of ``threshold`` (the ``keep``-th best exact score of the images the search already
    scored) and the ``keep``-th best lower bound among these candidates — so it cannot be
    among the best ``keep`` (but with probability at most ``error`` per bound). Each outcome
    the bounds see is 0/1: a flip, or (with ``source_clusters``) a pasted test image landing in
    the candidate's source cluster — whether it was there before is known for every test image
    without a forward pass, and subtracted exactly. Each
    candidate is pasted at the very corners ``flip_counts`` would draw from ``generator``, so
    a candidate tested to the end has exactly its exhaustive score. A stopped candidate's
    score is its estimate ``T · sum / tested``. Returns (float32 scores ``c``, int64 test images
    each was scored on ``c``), on the images' device and the CPU."""
    n_cand, _, window, _ = triggers.shape
    n_test = test_index.numel()
    size, device = images.shape[-1], images.device
    per_batch = max(1, candidates_per_batch)
    corners = torch.cat([torch.randint(0, corner_positions or size - window + 1,
                                       (min(per_batch, n_cand - start) * n_test, 2),
                                       generator=generator, device=generator.device)
                         for start in range(0, n_cand, per_batch)]
                        or [torch.empty(0, 2, dtype=torch.long)]).view(n_cand, n_test, 2)
    test_images = images[test_index.to(device)]
    before = test_labels.to(device).long()
    # the score's known part: test images already in the candidate's source cluster
    already = torch.zeros(n_cand, dtype=torch.float64)
    if source_clusters is not None and n_cand:
        in_cluster = torch.bincount(before.cpu(), minlength=int(source_clusters.max()) + 1)
        already = in_cluster.double()[source_clusters.cpu().long()]
    sums = torch.zeros(n_cand, dtype=torch.float64)
    ones = torch.zeros(n_cand, dtype=torch.float64)
    tested = torch.zeros(n_cand, dtype=torch.long)
    active = torch.ones(n_cand, dtype=torch.bool)
    looks = look_sizes(n_test)
    buffer = torch.empty(min(per_batch * n_test, max(n_cand, 1) * n_test), 3, size, size,
                         dtype=dtype, device=device)
    seen = 0
    for look in looks:
        columns = order[seen:look]
        rows = torch.nonzero(active).flatten()
        jobs_rows = rows.repeat_interleave(columns.numel())
        jobs_cols = columns.repeat(rows.numel())
        for start in range(0, jobs_rows.numel(), buffer.shape[0]):
            cand = jobs_rows[start:start + buffer.shape[0]]
            col = jobs_cols[start:start + buffer.shape[0]]
            view = buffer[:cand.numel()]
            picked = corners[cand, col].to(device)
            paste(test_images, triggers.to(device), col.to(device), cand.to(device),
                  picked[:, 0], picked[:, 1], mean=mean, std=std, out=view)
            after, _ = encode_assign(view)
            after, was = after.long(), before[col.to(device)]
            if source_clusters is None:
                landed = outcome = (after != was).double()
            else:
                target = source_clusters.to(device)[cand.to(device)].long()
                landed = (after == target).double()
                outcome = landed - (was == target).double()
            sums.index_add_(0, cand, outcome.cpu())
            ones.index_add_(0, cand, landed.cpu())
        tested[rows] = look
        seen = look
        if look == n_test:
            break
        lower, upper = flip_bounds(ones[rows], look, n_test, error, len(looks))
        lower, upper = lower - already[rows], upper - already[rows]
        bar = threshold
        if rows.numel() >= keep:
            bar = max(bar, float(lower.topk(keep).values[-1]))
        active[rows[upper < bar]] = False
    scores = torch.where(tested == n_test, sums, sums * n_test / tested.clamp(min=1))
    return scores.float().to(device), tested


@torch.no_grad()
def pasted_clusters(encode_assign, images: torch.Tensor, rows: torch.Tensor,
                    patches: torch.Tensor, mean, std, *, candidates_per_batch: int,
                    generator: torch.Generator, dtype: torch.dtype = torch.float32,
                    corner_positions: int | None = None) -> torch.Tensor:
    """The clusters (int64 ``p×r``, on the CPU) of the bank rows ``rows`` (int64 ``r``) with
    each of the ``patches`` (uint8 ``p×3×w×w``) pasted at uniform random corners, as
    ``flip_counts`` pastes."""
    found = [after.cpu().long() for _, after in _pasted_assignments(
        encode_assign, images, rows, patches, mean, std, candidates_per_batch, generator,
        dtype, corner_positions)]
    return torch.cat(found) if found else torch.empty(0, rows.numel(), dtype=torch.long)


def capture_shares(after: torch.Tensor, before: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """How strongly each pasted candidate pulls the test images into one cluster: from their
    clusters ``after`` (int64 ``c×T``, ``pasted_clusters``) and ``before`` (int64 ``T``), the
    share of the test images outside cluster ``d`` that moved into ``d``, for the cluster ``d``
    most of them moved into. A backdoor trigger overrides an image's content and sends most
    images to its target's cluster (share near its attack success rate); a window of ordinary
    content scatters the few it moves. Returns (float32 shares ``c`` in [0, 1], int64
    destination clusters ``c``, −1 where none moved)."""
    shares = torch.zeros(after.shape[0], dtype=torch.float32)
    destinations = torch.full((after.shape[0],), -1, dtype=torch.long)
    for row, assigned in enumerate(after):
        moved = assigned[assigned != before]
        if moved.numel() == 0:
            continue
        destination = int(torch.bincount(moved).argmax())
        shares[row] = pulled_into(assigned[None], before, destination)
        destinations[row] = destination
    return shares, destinations


def pulled_into(after: torch.Tensor, before: torch.Tensor, cluster: int) -> float:
    """The mean over the rows of ``after`` (int64 ``p×T``) of the share of the ``T`` images
    outside ``cluster`` (by ``before``, int64 ``T``) that it holds in ``cluster``."""
    outside = before != cluster
    if after.numel() == 0 or not bool(outside.any()):
        return 0.0
    return float(((after == cluster) & outside).sum(1).float().mean() / outside.sum())

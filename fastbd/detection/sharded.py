"""The detector's work split over the ranks of a ``torch.distributed`` world (one rank without a
process group): features of the bank, the rounds of the cluster search, the ensemble's logits.

Every split is into blocks a single process also computes one at a time (an encoding batch, a
block of ``Config.search_block`` candidates drawn with its own generator), so the gathered result
is the single-process result whatever the world size (``fastbd.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastbd.detection.classifier import ensemble_logits
from fastbd.distributed import gather_objects, gather_rows, map_shards, shard
from fastbd.models.encoders import Encoder, embed_images

# score_block(bank rows int64 b, generator) -> (scores float b, windows int64 b×2,
# attention maps float b×S×S)
BlockScorer = Callable[[torch.Tensor, torch.Generator],
                       tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
TopMaps = dict[int, tuple[float, torch.Tensor]]


def sharded_features(encoder: Encoder, bank: torch.Tensor, batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """Unit features float32 ``N×D`` on ``device`` of the uint8 ``bank`` (``N×3×S×S``): each rank
    encodes its shard of whole ``batch_size`` batches, the shards are gathered."""
    return map_shards(bank.shape[0], batch_size, lambda rows: embed_images(
        encoder, bank[rows.start:rows.stop], batch_size=batch_size, device=device))


def sharded_logits(models: list[nn.Module], bank: torch.Tensor, mean, std, batch_size: int,
                   weights: list[int]) -> torch.Tensor:
    """The ensemble's weighted logits float32 ``N×2`` of every bank image, each rank computing
    its shard of whole batches (``ensemble_logits``)."""
    return map_shards(bank.shape[0], batch_size, lambda rows: ensemble_logits(
        models, bank[rows.start:rows.stop], mean, std, batch_size, weights=weights))


def keep_top_maps(top_maps: TopMaps, items: list[tuple[int, float, torch.Tensor]], topk: int,
                  ties_kept: int) -> None:
    """Add ``items`` (row, score, map) to ``top_maps`` and keep the best ``topk`` and every map
    tied with the last of them, at most ``ties_kept · topk`` (ties in insertion order)."""
    for row, score, amap in items:
        top_maps[row] = (score, amap)
    ordered = sorted(top_maps.items(), key=lambda kv: -kv[1][0])
    cut = ordered[:topk]
    if len(ordered) > len(cut):
        last = cut[-1][1][0]
        cut = [kv for kv in ordered if kv[1][0] >= last][:ties_kept * topk]
    top_maps.clear()
    top_maps.update(cut)


def _contenders(rows: list[int], scores: list[float], maps: torch.Tensor, top_maps: TopMaps,
                topk: int, ties_kept: int) -> list[tuple[int, float, torch.Tensor]]:
    """The items of one rank's block results that can still enter ``top_maps`` after the round
    (``keep_top_maps``): its ``ties_kept · topk`` best (later ones have that many ahead of them
    on every rank's list), none scoring below the ``topk``-th map already kept. Only these maps
    travel between ranks."""
    bar = None
    if len(top_maps) >= topk:
        bar = sorted((score for score, _ in top_maps.values()), reverse=True)[topk - 1]
    order = sorted(range(len(rows)), key=lambda i: -scores[i])[:ties_kept * topk]
    picked = sorted(i for i in order if bar is None or scores[i] >= bar)
    return [(rows[i], scores[i], maps[i]) for i in picked]


def score_round(rows: torch.Tensor, generator: torch.Generator, block: int,
                score_block: BlockScorer, top_maps: TopMaps, topk: int, ties_kept: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one search round's ``rows`` (int64 ``B``): cut into blocks of ``block``, each scored
    with a generator of its own (seeded from ``generator``), the blocks dealt over the ranks,
    scores and windows gathered and ``top_maps`` updated identically on every rank. Returns
    scores float32 ``B`` and windows int64 ``B×2`` (CPU)."""
    n_blocks = -(-rows.numel() // block)
    seeds = torch.randint(2**62, (n_blocks,), generator=generator).tolist()
    mine = shard(rows.numel(), block)
    scores, windows, maps = [torch.empty(0)], [torch.empty(0, 2, dtype=torch.long)], []
    for start in range(mine.start, mine.stop, block):
        part = rows[start:start + block]
        block_scores, block_windows, block_maps = score_block(
            part, torch.Generator().manual_seed(seeds[start // block]))
        scores.append(block_scores.float().cpu())
        windows.append(block_windows.long().cpu())
        maps.append(block_maps.float().cpu())
    local_rows = rows[mine.start:mine.stop].tolist()
    local_scores = torch.cat(scores)
    local_maps = torch.cat(maps) if maps else torch.empty(0)
    contenders = _contenders(local_rows, local_scores.tolist(), local_maps, top_maps, topk,
                             ties_kept)
    keep_top_maps(top_maps, [item for part in gather_objects(contenders) for item in part],
                  topk, ties_kept)
    return gather_rows(local_scores), gather_rows(torch.cat(windows))

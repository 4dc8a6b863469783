"""What every CLIP defense shares: checking a pair set against a model, pair similarities,
UBT's suspicious split (the lowest-similarity pairs under a clean reference), the small-data
epoch rule, and the saved stages of a resumable defense run."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fastbd.distributed import map_shards
from fastbd.models.clip import encode_images, encode_texts
from fastbd.models.encoders import working_copy
from fastbd.ops import pair_cosine
from fastbd.storage import NO_STAGES, StageFiles, fingerprint, module_fingerprint
from fastbd.validation import at_least, fraction, one_of

log = logging.getLogger(__name__)

SPLIT_RULES = {"susp_fraction": fraction(low_open=True, high_open=True),
               "split": one_of("fixed", "adaptive"),
               "batch_size": at_least(2), "seed": at_least(0)}
"""``check_fields`` rules of the settings UBT and ABL share: a suspicious fraction in (0, 1),
the split rule (``fixed``: that fraction; ``adaptive``: at least that fraction, more when more
pairs lie far below the rest — ``far_low_share``), batches of ≥ 2 pairs, a
seed ≥ 0."""
SIMILARITY_BLOCK = 1024
"""Pairs per block of the sharded similarity pass: a multiple of ``encode_images``' and
``encode_texts``' batches, so a shard encodes in the batches one process does."""
FAR_OUT = 3.0
"""Tukey's outer-fence multiple of the interquartile range: values beyond it are "far out"."""


def check_pairs(images: torch.Tensor, tokens: torch.Tensor, model: nn.Module) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} "
                         f"{tuple(images.shape)}")
    if tokens.ndim != 2 or tokens.shape[0] != images.shape[0]:
        raise ValueError(f"tokens must be N×L with N={images.shape[0]}, got "
                         f"{tuple(tokens.shape)}")
    if images.shape[0] == 0:
        raise ValueError("the pair set is empty")
    context = model.positional_embedding.shape[0]
    if tokens.shape[1] != context:
        raise ValueError(f"tokens have length {tokens.shape[1]} but the model's context is "
                         f"{context}; tokenize with context_length={context}")


def similarities(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 device: torch.device | str) -> torch.Tensor:
    """Cosine of every pair, float32 ``N`` (``pair_cosine`` of the two towers' embeddings); in a
    ``torch.distributed`` world each rank computes its shard of whole ``SIMILARITY_BLOCK``-pair
    blocks (the encoders' batches divide it) and the shards are gathered."""

    def shard_cosines(rows: range) -> torch.Tensor:
        if not rows:
            return torch.empty(0)
        part = slice(rows.start, rows.stop)
        return pair_cosine(encode_images(model, images[part], device=device),
                           encode_texts(model, tokens[part], device=device)).cpu()

    return map_shards(images.shape[0], SIMILARITY_BLOCK, shard_cosines)


def far_low_share(similarity: torch.Tensor) -> float:
    """The share of pairs "far out" below the rest (Tukey's outer fence: below
    ``Q1 − FAR_OUT·IQR`` of ``similarity``, float ``N``). Poisoned pairs — a triggered image
    whose caption names a class it does not show — fall there under a clean model, at whatever
    rate they were planted; a clean set keeps about 1 % of its hardest pairs there."""
    x = similarity.double().flatten().cpu()
    if x.numel() < 4:
        return 0.0
    q1, q3 = x.quantile(0.25), x.quantile(0.75)
    return float((x < q1 - FAR_OUT * (q3 - q1)).double().mean())


def suspicious_split(reference: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     fraction: float, device: torch.device | str, adaptive: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: (similarity of every pair under ``reference`` float32 ``N``, D_susp = indices of
    the ``max(1, round(f·N))`` lowest, D_normal = the other indices in order), with
    ``f = fraction`` or, ``adaptive``, ``max(fraction, far_low_share(similarity))``."""
    reference_sim = similarities(working_copy(reference, device), images, tokens, device)
    n = reference_sim.numel()
    if adaptive:
        share = far_low_share(reference_sim)
        log.info("suspicious split: %.2f %% of the pairs lie far below the rest (floor %.2f %%)",
                 100 * share, 100 * fraction)
        fraction = max(fraction, share)
    suspicious = torch.topk(reference_sim, max(1, round(fraction * n)), largest=False).indices
    normal_mask = torch.ones(n, dtype=torch.bool)
    normal_mask[suspicious] = False
    return reference_sim, suspicious, torch.nonzero(normal_mask).flatten()


def stage_epochs(n: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Epochs over ``n`` items for a stage of ``epochs`` epochs raised to ≥ ``min_steps``
    steps (``Config.*_min_steps``); a stage of 0 epochs stays off."""
    if epochs == 0:
        return 0
    per_epoch = max(1, math.ceil(n / batch_size))
    return max(epochs, math.ceil(min_steps / per_epoch))


def defense_stages(checkpoint_dir: str | Path | None, prefix: str, config: object,
                   images: torch.Tensor, tokens: torch.Tensor, model: nn.Module,
                   reference: nn.Module | None = None, save_every_s: float = 60.0
                   ) -> StageFiles:
    """The stage files ``<prefix>-<stage>.pt`` of a defense run in ``checkpoint_dir`` (None:
    none kept), tagged with its config and fingerprints of the pairs, the model and the
    reference model (when there is one)."""
    if checkpoint_dir is None:
        return NO_STAGES
    run = {"config": asdict(config), "pairs": fingerprint(images, tokens),
           "model": module_fingerprint(model)}
    if reference is not None:
        run["reference"] = module_fingerprint(reference)
    return StageFiles(checkpoint_dir, prefix, run, save_every_s)


def saved_split(stages: StageFiles, reference: nn.Module, images: torch.Tensor,
                tokens: torch.Tensor, susp_fraction: float, device: torch.device,
                adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``suspicious_split``, loaded from ``stages`` when a run with the same tag saved it."""
    saved = stages.load("split")
    if saved is not None:
        stages.resumed_seconds["split"] = float(saved.get("seconds", 0.0))
        return saved["reference_similarity"], saved["suspicious"], saved["normal"]
    start = time.perf_counter()
    reference_sim, suspicious, normal = suspicious_split(reference, images, tokens,
                                                         susp_fraction, device, adaptive)
    stages.save("split", {"reference_similarity": reference_sim.cpu(),
                          "suspicious": suspicious.cpu(), "normal": normal.cpu(),
                          "seconds": time.perf_counter() - start})
    return reference_sim, suspicious, normal



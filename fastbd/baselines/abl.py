"""ABL (Li et al., 2021) for CLIP: gradient ascent on the CLIP loss of the suspicious set D_susp
itself (the lowest-similarity pairs under a clean reference, the same split as UBT's step 1),
with no overfitting or ranking. Two schedules: ``ABLConfig`` gives it UBT's (fastbd's
comparison at the same budget), ``ABLPaperConfig`` the UBT paper's (``fastbd abl-paper``).
``masked_captions`` adds UBT's token mask (the paper's Table II "ABL + text mask")."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastbd.clipdefense import (
    SPLIT_RULES,
    DefenseResult,
    check_pairs,
    defense_stages,
    masked_tokens,
    saved_split,
    stage_epochs,
)
from fastbd.clipdefense.relevance import token_relevance
from fastbd.devices import device_of
from fastbd.distributed import average_gradients
from fastbd.schedules import adamw
from fastbd.training.clip import batch_clip_loss, finetune_mode, shuffled_batches
from fastbd.validation import above, at_least, check_fields, fraction


@dataclass
class ABLConfig:
    """UBT's split and unlearning schedule: at least 1 % suspicious (``split`` as in
    ``fastbd.ubt.Config``), 5 epochs at lr 1e-5, batch 64, at least ``min_steps`` steps (the
    same small-dataset scaling as ``fastbd.ubt.Config``). ``masked_captions`` (the UBT paper's
    "ABL + text mask", Table II; off in plain ABL): each step ascends the mean of the InfoNCE
    of the batch's pairs and of their images with their masked captions — the tokens of token
    relevance (Chefer, under the model being defended) ≥ ``token_threshold``, as UBT masks its
    top pairs' captions (``start_layer`` as there)."""

    susp_fraction: float = 0.01
    split: str = "adaptive"
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 64
    min_steps: int = 300
    masked_captions: bool = False
    token_threshold: float = 0.1
    start_layer: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, **SPLIT_RULES, epochs=at_least(0), lr=above(0),
                     min_steps=at_least(0), token_threshold=fraction())


@dataclass
class ABLPaperConfig(ABLConfig):
    """ABL as the UBT paper runs its baseline (REFERENCE.md): D_susp = UBT's fixed 1 % split,
    batch 64, lr 1e-6, 10 epochs (``min_steps`` as in ``ABLConfig``: it only matters where
    10 epochs are fewer steps, far below the paper's 500K pairs)."""

    split: str = "fixed"
    epochs: int = 10
    lr: float = 1e-6


def masked_captions(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                    config: ABLConfig, device: torch.device) -> torch.Tensor:
    """The pairs' (uint8 images ``n×3×S×S``, token ids ``n×L``) captions masked to their tokens
    of relevance ≥ ``config.token_threshold`` under ``model`` (token ids ``n×L``, on the
    CPU), ``config.batch_size`` pairs at a time."""
    out = torch.zeros_like(tokens)
    for start in range(0, tokens.shape[0], config.batch_size):
        rows = slice(start, start + config.batch_size)
        batch = tokens[rows].to(device)
        relevance = token_relevance(model, images[rows].to(device), batch,
                                    start_layer=config.start_layer)
        out[rows] = masked_tokens(batch, relevance, config.token_threshold)[0].cpu()
    return out


def abl(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *, reference: nn.Module,
        config: ABLConfig | None = None, device: torch.device | str | None = None,
        verbose: bool = True, checkpoint_dir: str | Path | None = None,
        save_every_s: float = 60.0) -> DefenseResult:
    """Gradient ascent on InfoNCE over D_susp batches, on a copy of ``model`` (pairs: uint8
    images ``N×3×S×S``, token ids ``N×L``), on ``device`` (default: the model's). Arguments as
    ``fastbd.ubt.defend``; the split and the ascent's state are kept as ``abl-*.pt``."""
    config = config or ABLConfig()
    check_pairs(images, tokens, model)
    check_pairs(images, tokens, reference)
    device = device_of(model, device)
    stages = defense_stages(checkpoint_dir, "abl", config, images, tokens, model, reference,
                            save_every_s)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reference_sim, suspicious, _ = saved_split(stages, reference, images, tokens,
                                               config.susp_fraction, device,
                                               config.split == "adaptive")
    timings["suspicious_split"] = (time.perf_counter() - start
                                   + stages.resumed_seconds.get("split", 0.0))
    start = time.perf_counter()
    tuned = copy.deepcopy(model).to(device)
    masked = (masked_captions(tuned, images[suspicious], tokens[suspicious], config, device)
              if config.masked_captions else None)
    finetune_mode(tuned)
    optimizer = adamw(tuned.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    epochs = stage_epochs(suspicious.numel(), config.batch_size, config.epochs,
                          config.min_steps)
    saved, done = stages.training_state("ascent", {"model": tuned}, optimizer, {"batches": g},
                                        device)
    for epoch in tqdm(range(done, epochs), initial=done, total=epochs, desc="ABL ascent",
                      disable=not verbose):
        for rows in shuffled_batches(suspicious.numel(), config.batch_size, g):
            if rows.numel() < 2:
                continue
            picked = suspicious[rows]
            loss = -batch_clip_loss(tuned, images[picked], tokens[picked], device)
            if masked is not None:
                loss = (loss - batch_clip_loss(tuned, images[picked], masked[rows], device)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(tuned.parameters())
            optimizer.step()
        saved.save(epoch + 1, final=epoch + 1 == epochs)
    tuned.eval()
    timings["unlearn"] = time.perf_counter() - start + stages.resumed_seconds.get("ascent", 0.0)
    return DefenseResult(model=tuned, method="abl", suspicious=suspicious,
                         reference_similarity=reference_sim, timings=timings,
                         config=asdict(config), checkpoint_files=stages.existing())

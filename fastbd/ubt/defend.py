"""UBT (DESIGN.md §6): purify a backdoored CLIP by token-level unlearning of a few pairs.

1. Suspicious split: the lowest-similarity pairs under a clean reference model —
   ``susp_fraction`` of them, or more where more lie far below the rest (``split``).
2. Overfit a copy of the model: ``(S − 1)²`` on suspicious batches + InfoNCE on normal batches.
3. Rank the suspicious pairs and keep the top ``ceil(sqrt(|D_susp|))``. The paper ranks by
   similarity under the overfit model (``ranking="overfit"``); with a reference trained on
   other data that puts memorised clean hard pairs first. fastbd's default
   (``ranking="cross-match"``) takes the *block* a backdoor forms: pairs whose images the
   overfit model matches with each other's captions while the reference does not
   (``backdoor_block``; every triggered image with every target caption).
4. Poisoned-model check (ours; the paper has none): how the model being defended (``m``) and
   the reference (``r``) match the top pairs' images with each other's captions, each by rank
   against random captions (0 = as random captions, 1 = above every random caption). A
   backdoor's block: the model matches them more like true pairs than random ones (``m ≥ ½``)
   and the clean reference no better than random captions (``r ≤ 0``). The statistic
   ``min(m, ½ − r)`` (``check_statistic``) reaches ``check_threshold`` (½) exactly when both
   hold; below it the model is returned unchanged (``poisoned=False``).
5. Token relevance (Chefer) of the top captions under the poisoned model; masked captions keep
   the tokens with relevance ≥ ``token_threshold``.
6. Unlearn: minimise the mean cosine over every (image i, caption j) and (image i, masked
   caption j) — and (masked image i, …) with ``masked_images`` — for i, j in the top pairs,
   on the poisoned model (plus ``retain_weight`` × how far the model has moved pairs from the
   most typical ``retain_fraction`` of D_normal from its own embeddings of them before
   unlearning, our addition: ``embedding_drift``). BatchNorm statistics stay frozen in both
   training stages (``finetune_mode``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastbd.clipdefense import (
    SPLIT_RULES,
    check_pairs,
    defense_stages,
    masked_tokens,
    saved_split,
    similarities,
    stage_epochs,
)
from fastbd.clipdefense.occlusion import masked_images, patch_relevance
from fastbd.clipdefense.relevance import token_relevance
from fastbd.devices import device_of
from fastbd.distributed import average_gradients
from fastbd.models.clip import encode_images, encode_texts
from fastbd.models.encoders import working_copy
from fastbd.schedules import adamw
from fastbd.storage import (
    NO_STAGES,
    StageFiles,
)
from fastbd.training.clip import (
    batch_clip_loss,
    embedding_drift,
    finetune_mode,
    indexed_pair_cosines,
    pair_features,
    shuffled_batches,
    trained_pair_cosines,
)
from fastbd.ubt.result import UBTResult
from fastbd.validation import above, at_least, check_fields, fraction, one_of

log = logging.getLogger(__name__)


@dataclass
class Config:
    """UBT hyperparameters; the paper's defaults unless marked.

    ``split``: ``adaptive`` (ours; the paper's is ``fixed``): D_susp is the larger of
    ``susp_fraction`` and the share of pairs far below the rest under the reference model
    (``far_low_share``), so a poison rate above 1 % is not left in D_normal; a clean set's far
    tail is about 1 %, so the split stays at ``susp_fraction`` there.
    ``topk=None``: ``ceil(sqrt(|D_susp|))`` (the paper's ``sqrt(|D|·susp_fraction)`` for
    the split taken). Automatic scaling for small datasets
    (ours): the overfit and unlearning stages run at least ``overfit_min_steps`` and
    ``unlearn_min_steps`` optimiser steps — epochs are raised until they do. At the paper's 500K
    pairs the stages already take ~400 and ~800 steps, so this changes nothing there; at 5,000
    pairs they would otherwise be 5 and 10 steps.
    ``retain_weight`` (ours, 0 = the paper's pure gradient ascent): the unlearning loss adds this
    weight times the ``embedding_drift`` of a D_normal batch from the defended model's own
    embeddings of it before unlearning — the purified model must embed clean pairs as the model it
    was given did; without it unlearning a few pairs whose captions all name the target class
    forgets the target class itself (docs/methods.md, "UBT"). ``retain_fraction`` (ours): the retain
    batches come from that share of D_normal the reference model rates most similar, so poison
    beyond D_susp (which sits at the low end) is not kept. ``masked_captions``: unlearn (image,
    masked caption) pairs too. ``masked_images`` (the paper's Table IV "image mask"; off, as in
    UBT): unlearn (masked image, caption) pairs too — each top image rebuilt from its windows of
    occlusion relevance ≥ ``image_threshold`` on a ``image_cells × image_cells`` grid
    (``fastbd.clipdefense.occlusion``), the rest filled with the mean colour.
    ``ranking`` (step 3): ``cross-match`` (ours: the backdoor's block, ``backdoor_block``) or
    ``overfit`` (the paper's: similarity under the overfit model).
    Ablations (the paper's Fig. 4 and Table IV): ``overfit_normal=False`` overfits on D_susp
    alone, without the D_normal InfoNCE term; ``masked_captions=False`` unlearns the original
    captions only (gradient ascent without the token mask); ``masked_images=True`` adds the
    image mask (with ``masked_captions=False``: Table IV's "image mask + GA").
    ``check_threshold``: the check statistic (step 4) at or above which the model is called
    poisoned (½: the model matches the block halfway from random captions to true pairs or
    more, the reference no better than random captions); ``check_sample``: D_normal pairs each
    model's scale and random captions come from."""

    susp_fraction: float = 0.01
    split: str = "adaptive"
    topk: int | None = None
    overfit_epochs: int = 5
    overfit_lr: float = 1e-6
    unlearn_epochs: int = 5
    unlearn_lr: float = 1e-5
    batch_size: int = 64
    token_threshold: float = 0.1
    start_layer: int = -1
    masked_captions: bool = True
    masked_images: bool = False
    image_cells: int = 7
    image_threshold: float = 0.1
    overfit_normal: bool = True
    overfit_min_steps: int = 60
    unlearn_min_steps: int = 300
    retain_weight: float = 10.0
    retain_fraction: float = 0.5
    ranking: str = "cross-match"
    check_threshold: float = 0.5
    check_sample: int = 1000
    skip_check: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, **SPLIT_RULES, topk=at_least(1), overfit_epochs=at_least(0),
                     overfit_lr=above(0), unlearn_epochs=at_least(0), unlearn_lr=above(0),
                     token_threshold=fraction(), image_cells=at_least(1),
                     image_threshold=fraction(), overfit_min_steps=at_least(0),
                     unlearn_min_steps=at_least(0), retain_weight=at_least(0),
                     retain_fraction=fraction(low_open=True), check_sample=at_least(2),
                     ranking=one_of("cross-match", "overfit"))


def retain_pool(reference_sim: torch.Tensor, normal: torch.Tensor, fraction: float
                ) -> torch.Tensor:
    """The ``ceil(fraction·|D_normal|)`` D_normal indices (at least 2 where there are) with the
    highest reference similarity ``reference_sim`` (float ``N``)."""
    keep = min(normal.numel(), max(2, math.ceil(fraction * normal.numel())))
    order = torch.argsort(reference_sim[normal], descending=True, stable=True)
    return normal[order[:keep]]


def overfit(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
            suspicious: torch.Tensor, normal: torch.Tensor, config: Config,
            device: torch.device, verbose: bool, stages: StageFiles = NO_STAGES) -> nn.Module:
    """A copy of ``model`` trained to sharpen the backdoor (step 2): each step
    ``mean((S − 1)²)`` on a D_susp batch plus InfoNCE on a D_normal batch (not with
    ``config.overfit_normal`` off: the paper's Fig. 4 ablation). With ``stages`` the
    training state is saved after epochs (at most every ``stages.save_every_s`` seconds, and
    after the last) and continued from."""
    tuned = copy.deepcopy(model).to(device)
    finetune_mode(tuned)
    optimizer = adamw(tuned.parameters(), lr=config.overfit_lr)
    g = torch.Generator().manual_seed(config.seed)
    epochs = stage_epochs(suspicious.numel(), config.batch_size, config.overfit_epochs,
                          config.overfit_min_steps)
    saved, done = stages.training_state("overfit", {"model": tuned}, optimizer, {"batches": g},
                                        device)
    for epoch in tqdm(range(done, epochs), initial=done, total=epochs, desc="UBT overfit",
                      disable=not verbose):
        normal_batches = shuffled_batches(normal.numel(), config.batch_size, g)
        for step, rows in enumerate(shuffled_batches(suspicious.numel(), config.batch_size, g)):
            susp = suspicious[rows]
            loss = (trained_pair_cosines(tuned, images[susp], tokens[susp], device)
                    - 1).pow(2).mean()
            if normal_batches and config.overfit_normal:
                other = normal[normal_batches[step % len(normal_batches)]]
                if other.numel() > 1:
                    loss = loss + batch_clip_loss(tuned, images[other], tokens[other], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(tuned.parameters())
            optimizer.step()
        saved.save(epoch + 1, final=epoch + 1 == epochs)
    return tuned.eval()


def unlearn(model: nn.Module, images: torch.Tensor, captions: torch.Tensor, config: Config,
            device: torch.device, verbose: bool,
            retain: Retain | None = None, stages: StageFiles = NO_STAGES) -> None:
    """Minimise the mean cosine of every image with every caption (step 6), in place; each
    batch encodes its distinct images and captions once.
    ``images`` uint8 ``k×3×S×S``; ``captions`` ``c×L`` (originals and masked). ``retain``: the
    pairs of the ``retain_weight`` term, a random batch of them per step. With
    ``stages`` the training state is saved after epochs (as in ``overfit``) and continued
    from."""
    k, c = images.shape[0], captions.shape[0]
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(c))
    optimizer = adamw(model.parameters(), lr=config.unlearn_lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    epochs = stage_epochs(pairs.shape[0], config.batch_size, config.unlearn_epochs,
                          config.unlearn_min_steps)
    use_retain = retain is not None and config.retain_weight > 0 and retain.rows.numel() > 0
    finetune_mode(model)
    saved, done = stages.training_state("unlearn", {"model": model}, optimizer, {"batches": g},
                                        device)
    for epoch in tqdm(range(done, epochs), initial=done, total=epochs, desc="UBT unlearn",
                      disable=not verbose):
        for rows in shuffled_batches(pairs.shape[0], config.batch_size, g):
            loss = indexed_pair_cosines(model, images, captions, pairs[rows, 0],
                                        pairs[rows, 1], device).mean()
            if use_retain:
                picks = torch.randint(retain.rows.numel(),
                                      (min(config.batch_size, retain.rows.numel()),), generator=g)
                batch_images = retain.images[retain.rows[picks]]
                batch_tokens = retain.tokens[retain.rows[picks]]
                with torch.no_grad():
                    anchors = pair_features(retain.anchor, batch_images, batch_tokens, device)
                loss = loss + config.retain_weight * embedding_drift(
                    model, batch_images, batch_tokens, *anchors, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model.parameters())
            optimizer.step()
        saved.save(epoch + 1, final=epoch + 1 == epochs)
    model.eval()


@dataclass
class Retain:
    """The pairs unlearning keeps as they were: all images (uint8 ``N×3×S×S``) and tokens
    (``N×L``), the retain pool's indices ``rows`` (int64 ``r``) and ``anchor``, the defended
    model as it was given (never trained), whose embeddings of each step's batch the unlearned
    model is held to — computed per batch, so memory does not grow with the pool."""

    images: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor
    anchor: nn.Module


@dataclass
class Calibrated:
    """Unit-norm image and caption embeddings (float32 ``r×E`` each, on the CPU) of some pairs
    under one model, with that model's scale: ``matched`` = the mean cosine of true pairs,
    ``unmatched`` = of an image with another pair's caption (over D_normal samples), and
    ``others`` (float32 ``m×E``) the captions of those samples. ``z`` puts a cosine on that
    scale: 0 = as unrelated pairs, 1 = as true pairs, so models with different cosine ranges
    compare."""

    images: torch.Tensor
    captions: torch.Tensor
    matched: float
    unmatched: float
    others: torch.Tensor

    def z(self, cosine: torch.Tensor) -> torch.Tensor:
        return (cosine - self.unmatched) / (self.matched - self.unmatched)

    def block_match(self, top: torch.Tensor) -> float:
        """How this model matches the ``top`` pairs' (int64 positions ``k``) images with each
        other's captions, by rank: over a ≠ b, the share of the ``others`` captions that
        image a matches less than caption b (ties half), as ``2·share − 1`` — 0 when b is
        to a as a random caption is, 1 when b beats every random caption. A rank, not a
        cosine: a model that separates classes less sharply (a reference trained on less
        data) still ranks a caption of an image's own class above most random captions."""
        k = top.numel()
        random_cos = (self.images[top] @ self.others.T).sort(dim=1).values  # k×m
        block = self.images[top] @ self.captions[top].T  # k×k
        below = torch.searchsorted(random_cos, block.contiguous(), right=False)
        at_most = torch.searchsorted(random_cos, block.contiguous(), right=True)
        share = (below + at_most).double() / (2 * random_cos.shape[1])
        off = ~torch.eye(k, dtype=torch.bool)
        return float(2 * share[off].mean() - 1)


def calibrated(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
               normal: torch.Tensor, config: Config, device: torch.device | str
               ) -> Calibrated | None:
    """``Calibrated`` embeddings of pairs ``rows`` under ``model``, its scale measured on up to
    ``check_sample`` random D_normal pairs (each image against its own caption and against
    the next sampled pair's); None when it cannot be measured (fewer than 2 D_normal pairs, or
    a model that rates true pairs no higher than unrelated ones)."""
    g = torch.Generator().manual_seed(config.seed + 2)
    sample = normal[torch.randperm(normal.numel(), generator=g)[:config.check_sample]]
    if sample.numel() < 2:
        return None
    sample_images, sample_captions = unit_embeddings(model, images, tokens, sample, device)
    matched = float((sample_images * sample_captions).sum(-1).mean())
    unmatched = float((sample_images * sample_captions.roll(1, 0)).sum(-1).mean())
    if matched <= unmatched:
        return None
    return Calibrated(*unit_embeddings(model, images, tokens, rows, device), matched, unmatched,
                      sample_captions)


def cross_match(model: Calibrated, reference: Calibrated, members: torch.Tensor) -> torch.Tensor:
    """For every pair i (of the ``r`` both hold), the mean over the other ``members`` j (bool
    ``r``) of the disagreement ``z_model(cos) − z_reference(cos)`` between image i and caption j
    and between image j and caption i — how much more the model than the reference matches i
    with the members' captions and images. float64 ``r``; computed from sums of embeddings,
    never an ``r×r`` matrix."""
    count = members.double().sum() - members.double()
    total = torch.zeros(members.numel(), dtype=torch.float64)
    for calibrated_pairs, sign in ((model, 1.0), (reference, -1.0)):
        images, captions = calibrated_pairs.images.double(), calibrated_pairs.captions.double()
        own = (images * captions).sum(1) * members.double()
        with_captions = images @ captions[members].sum(0) - own
        with_images = captions @ images[members].sum(0) - own
        span = calibrated_pairs.matched - calibrated_pairs.unmatched
        for sums in (with_captions, with_images):
            total += sign * (sums - count * calibrated_pairs.unmatched) / span
    return total / (2 * count.clamp(min=1))


def closest_partners(model: Calibrated, reference: Calibrated, k: int, chunk: int = 1024
                     ) -> torch.Tensor:
    """For every pair i (of the ``r`` both hold), the mean of its ``k`` largest symmetric
    disagreements ``(d(i, j) + d(j, i)) / 2`` over j ≠ i, with ``d(i, j) = z_model(cos(image_i,
    caption_j)) − z_reference(…)``: how strongly i belongs to *some* group of ``k`` pairs the
    model matches and the reference does not, whatever the size of other groups. float64
    ``r``; ``chunk`` rows of the ``r×r`` disagreement at a time."""
    r = model.images.shape[0]
    out = torch.zeros(r, dtype=torch.float64)
    take = min(k, r - 1)
    if take < 1:
        return out
    for start in range(0, r, chunk):
        rows = slice(start, min(start + chunk, r))
        sym = torch.zeros(rows.stop - start, r, dtype=torch.float64)
        for c, sign in ((model, 1.0), (reference, -1.0)):
            images, captions = c.images.double(), c.captions.double()
            both = images[rows] @ captions.T + captions[rows] @ images.T
            sym += sign * (both / 2 - c.unmatched) / (c.matched - c.unmatched)
        sym[torch.arange(sym.shape[0]), torch.arange(start, rows.stop)] = -math.inf
        out[rows] = sym.topk(take, dim=1).values.mean(1)
    return out


def backdoor_block(model: Calibrated, reference: Calibrated, k: int, max_rounds: int = 50
                   ) -> torch.Tensor:
    """Step 3: the ``k`` suspicious pairs that form the block of a backdoor — pairs whose
    images the model matches with each other's captions while the reference does not (every
    poisoned image carries the trigger, every poisoned caption names the target: the model
    learned to match them all, a clean model sees unrelated pairs). Start from the ``k`` pairs
    with the strongest ``closest_partners``, then re-rank every pair by its ``cross_match``
    with the current ``k`` until the set stops changing (at most ``max_rounds``). Returns
    positions (int64 ``k``) into the pairs ``model`` and ``reference`` hold, best first."""
    n = model.images.shape[0]
    score = closest_partners(model, reference, k)
    members = torch.zeros(n, dtype=torch.bool)
    order = torch.argsort(score, descending=True, stable=True)[:k]
    for _ in range(max_rounds):
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order] = True
        if torch.equal(chosen, members):
            break
        members = chosen
        order = torch.argsort(cross_match(model, reference, members), descending=True,
                              stable=True)[:k]
    return order


def check_statistic(model: Calibrated | None, reference: Calibrated | None,
                    top: torch.Tensor) -> float:
    """Step 4: is the ``top`` block (int64 positions ``k``) a backdoor's? Each model matches
    the block's images with each other's captions, by rank against random captions
    (``Calibrated.block_match``: 0 = as a random caption, 1 = above every random caption):
    ``m`` under the model being defended, ``r`` under the reference. A backdoor's block is one
    the model matches more like true pairs than like random ones (``m ≥ ½``) while the clean
    reference finds the captions no closer to the images than random captions (``r ≤ 0``: a
    triggered image shows another class than the target its captions name). The statistic is
    ``min(m, ½ − r)``: at or above ½ exactly when both hold; a clean model's best block fails
    one side or both — the reference sees a relation the model sees, or the model sees none.
    +inf when it cannot be measured (fewer than 2 top pairs, or either scale unmeasurable):
    without a measurement the check cannot decline."""
    if model is None or reference is None or top.numel() < 2:
        return math.inf
    return min(model.block_match(top), 0.5 - reference.block_match(top))


def unit_embeddings(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                    rows: torch.Tensor, device: torch.device | str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm float32 image and caption embeddings (``r×E`` each, on the CPU) of pairs
    ``rows``."""
    return (encode_images(model, images[rows], device=device).cpu(),
            encode_texts(model, tokens[rows], device=device).cpu())


def defend(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
           reference: nn.Module, config: Config | None = None,
           device: torch.device | str | None = None, verbose: bool = True,
           checkpoint_dir: str | Path | None = None, save_every_s: float = 60.0) -> UBTResult:
    """Run UBT on pairs (uint8 images ``N×3×S×S``, token ids ``N×L``) with the clean
    ``reference`` model, on ``device`` (default: the model's). ``model`` and ``reference`` are
    left as they are; the purified copy is ``result.model``. With ``checkpoint_dir`` the
    suspicious split
    and the overfit and unlearning stages' training state (after an epoch, at most every
    ``save_every_s`` seconds, and after the last) are kept there
    (``ubt-*.pt``), a rerun with the same config, pairs and models continues from them to the
    result of an uninterrupted run, and they are deleted once the result is saved
    (``result.checkpoint_files``)."""
    config = config or Config()
    check_pairs(images, tokens, model)
    check_pairs(images, tokens, reference)
    device = device_of(model, device)
    reference = working_copy(reference, device)
    stages = defense_stages(checkpoint_dir, "ubt", config, images, tokens, model, reference,
                            save_every_s)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reference_sim, suspicious, normal = saved_split(stages, reference, images, tokens,
                                                    config.susp_fraction, device,
                                                    config.split == "adaptive")
    n_susp = suspicious.numel()
    timings["suspicious_split"] = (time.perf_counter() - start
                                   + stages.resumed_seconds.get("split", 0.0))

    start = time.perf_counter()
    tuned = overfit(model, images, tokens, suspicious, normal, config, device, verbose, stages)
    timings["overfit"] = time.perf_counter() - start + stages.resumed_seconds.get("overfit", 0.0)
    start = time.perf_counter()
    overfit_sim = similarities(tuned, images[suspicious], tokens[suspicious], device)
    k = config.topk or math.ceil(math.sqrt(n_susp))  # √(|D|·fraction) of the split taken
    k = min(k, n_susp)
    purified = copy.deepcopy(model).to(device).eval()
    reference_pairs = calibrated(reference, images, tokens, suspicious, normal, config, device)
    overfit_pairs = calibrated(tuned, images, tokens, suspicious, normal, config, device)
    if config.ranking == "cross-match" and reference_pairs is not None \
            and overfit_pairs is not None:
        top = backdoor_block(overfit_pairs, reference_pairs, k)
    else:
        top = torch.argsort(overfit_sim, descending=True, stable=True)[:k]
    topk = suspicious[top]
    statistic = check_statistic(
        calibrated(purified, images, tokens, suspicious, normal, config, device),
        reference_pairs, top)
    timings["rank"] = time.perf_counter() - start
    poisoned = config.skip_check or statistic >= config.check_threshold
    result = UBTResult(model=purified, suspicious=suspicious,
                       reference_similarity=reference_sim, timings=timings,
                       config=asdict(config), poisoned=poisoned, check_statistic=statistic,
                       topk=topk, overfit_similarity=overfit_sim)
    if not poisoned:
        log.info("UBT check: statistic %.2f below %.2f; model left unchanged", statistic,
                 config.check_threshold)
        result.checkpoint_files = stages.existing()
        return result
    start = time.perf_counter()
    top_images, top_tokens = images[topk], tokens[topk].to(device)
    relevance = token_relevance(purified, top_images.to(device), top_tokens,
                                start_layer=config.start_layer)
    masked, keep = masked_tokens(top_tokens, relevance, config.token_threshold)
    unlearn_images = top_images
    if config.masked_images:
        result.image_relevance = patch_relevance(purified, top_images, top_tokens,
                                                 cells=config.image_cells, device=device)
        rebuilt, result.image_keep = masked_images(top_images, result.image_relevance,
                                                   config.image_threshold, purified)
        unlearn_images = torch.cat([top_images, rebuilt])
    timings["attribution"] = time.perf_counter() - start
    start = time.perf_counter()
    captions = torch.cat([top_tokens, masked]) if config.masked_captions else top_tokens
    unlearn(purified, unlearn_images, captions.cpu(), config, device, verbose,
            retain=Retain(images, tokens,
                          retain_pool(reference_sim, normal, config.retain_fraction),
                          working_copy(model, device)),
            stages=stages)
    timings["unlearn"] = time.perf_counter() - start + stages.resumed_seconds.get("unlearn", 0.0)
    result.relevance, result.token_keep = relevance.cpu(), keep.cpu()
    result.checkpoint_files = stages.existing()
    return result

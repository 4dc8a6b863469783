"""The detection pipeline PoisonCAM and PatchSearch share (DESIGN.md §4–5).

    result = Detector(PoisonCAMMethod(), Config(...)).fit(encoder, images).result_

Stages: features + k-means clustering model; candidate windows (the ``DetectorMethod``'s);
flip test of every candidate on the test images; the iterative cluster search; the poison
classifier trained on the top-k triggers; classification of every image.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastbd.data.bank import ImageBank, place_images
from fastbd.detection.classifier import (
    clean_pool,
    otsu_threshold,
    train_poison_classifier,
)
from fastbd.detection.config import PRECISIONS, Config
from fastbd.detection.flip import (
    capture_shares,
    crop_windows,
    flip_counts,
    pasted_clusters,
    sequential_flip_counts,
)
from fastbd.detection.method import DetectorMethod, SearchContext
from fastbd.detection.result import DetectionResult
from fastbd.detection.search import AGGREGATES, SearchState, expected_scored, run_search
from fastbd.detection.sharded import score_round, sharded_features, sharded_logits
from fastbd.distributed import broadcast_object, world
from fastbd.eval.metrics import (
    box_iou,
    catch_rate,
    detection_metrics,
    per_target_detection,
    window_accuracy,
)
from fastbd.models.encoders import Encoder, forward_flops, working_copy
from fastbd.ops import all_finite
from fastbd.storage import StageFiles, fingerprint

log = logging.getLogger(__name__)
MAP_TIES_KEPT = 8
"""At most this many times ``topk_poisons`` attention maps are kept while the search runs
(the best ones and those tied with them)."""

class _Timer:
    """Seconds and images per stage, accumulated into the given dicts (a search state's, so an
    interrupted run's time stays counted when it is resumed)."""

    def __init__(self, seconds: dict[str, float] | None = None,
                 images: dict[str, int] | None = None) -> None:
        self.seconds: dict[str, float] = {} if seconds is None else seconds
        self.images: dict[str, int] = {} if images is None else images

    def into(self, seconds: dict[str, float], images: dict[str, int]) -> _Timer:
        """A timer on ``seconds`` / ``images`` holding their counts plus this one's."""
        merged = _Timer(seconds, images)
        for stage, value in self.seconds.items():
            merged.add(stage, value, self.images.get(stage, 0))
        return merged

    def add(self, stage: str, seconds: float, images: int = 0) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.images[stage] = self.images.get(stage, 0) + images

    def throughput(self) -> dict[str, float]:
        return {k: self.images[k] / self.seconds[k] for k in self.seconds
                if self.images.get(k) and self.seconds[k] > 0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_images(images: torch.Tensor | ImageBank) -> torch.Tensor:
    tensor = images.images if isinstance(images, ImageBank) else images
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.ndim != 4 \
            or tensor.shape[1] != 3 or tensor.shape[2] != tensor.shape[3]:
        raise ValueError("images must be a uint8 N×3×S×S tensor or an ImageBank")
    if tensor.shape[0] == 0:
        raise ValueError("the dataset is empty")
    return tensor


def search_settings(config: Config) -> dict[str, object]:
    """The fields of a (scaled) config that shape the search — all but the classifier's, the
    encoding batch size and where the images are kept, which a resumed run may change."""
    settings = config.to_dict()
    for name in ("classifier", "batch_size", "bank_placement", "exported_patches",
                 "search_budget_tflop", "warn_removed_fraction", "check", "check_threshold"):
        del settings[name]
    return settings


def _check_same_search(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume a search state saved by another search (method, settings, or the
    encoder / data behind the clustering)."""
    if not saved:
        log.warning("%s does not record which search saved it; resuming unchecked", path)
        return
    differ = [key for key in current if key != "config" and saved.get(key) != current[key]]
    differ += [f"config.{key}" for key, value in current["config"].items()
               if saved.get("config", {}).get(key) != value]
    if differ:
        raise ValueError(f"{path} was saved by another search ({', '.join(differ)} differ: "
                         "another encoder, dataset, method or config); run without --resume "
                         "or with the original settings")


class Detector:
    """The shared pipeline with a ``DetectorMethod`` plugged in: ``PoisonCAM`` and
    ``PatchSearch`` are ``Detector``s with their methods. ``fit`` leaves the caller's encoder as
    it was (a copy is moved or cast when needed); the result is ``result_``."""

    def __init__(self, method: DetectorMethod, config: Config | None = None) -> None:
        if not isinstance(method, DetectorMethod):
            raise TypeError(f"method must be a DetectorMethod, got {type(method).__name__}")
        if method.cluster_score not in AGGREGATES:
            raise ValueError(f"{type(method).__name__}.cluster_score must be one of "
                             f"{', '.join(AGGREGATES)}, got {method.cluster_score!r}")
        self.method = method
        self.config = config or Config()

    def fit(self, encoder: Encoder, images: torch.Tensor | ImageBank, *,
            device: torch.device | str | None = None, ground_truth: torch.Tensor | None = None,
            true_boxes: torch.Tensor | None = None, true_targets: torch.Tensor | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False,
            verbose: bool = True, max_rounds: int | None = None,
            save_every_s: float = 60.0) -> Detector:
        """Run the detector; the result is ``self.result_``. With ``checkpoint_dir`` the search
        state is saved after every round and the poison classifier's training state every
        ``save_every_s`` seconds; ``resume`` continues from them. The classifier's files are
        deleted when the result is saved (``DetectionResult.save``), the search state stays (a
        ``resume`` then skips the finished search). ``max_rounds`` stops the search early (the
        classifier then runs on what was scored). ``ground_truth``, ``true_boxes`` and, for a
        multi-target attack, ``true_targets`` (int64 ``N``: each poison's target, −1 clean;
        ``per_target_detection``) only feed the metrics."""
        bank = _as_images(images)
        state_path = Path(checkpoint_dir) / "search_state.pt" if checkpoint_dir else None
        if not resume and state_path is not None and state_path.is_file():
            saved = SearchState.load(state_path)
            if saved.remaining:  # refused before any work: a rerun must not overwrite it
                raise ValueError(
                    f"{state_path} holds an unfinished search ({saved.round} rounds, "
                    f"{int(saved.scored.sum())} images scored); continue it with --resume "
                    "(resume=True), or delete it or choose another output directory to start "
                    "afresh")
        device = torch.device(device) if device is not None else next(
            encoder.parameters()).device
        n, size = bank.shape[0], bank.shape[-1]
        config = self.config.scaled(n, size).for_device(device)
        dtype = PRECISIONS[config.precision]
        encoder = working_copy(encoder, device)
        infer = working_copy(encoder, device, dtype)
        bank = place_images(bank, device, config.bank_placement)
        timer = _Timer()
        mean, std = encoder.mean, encoder.std

        saved = None
        if resume:
            if state_path is None or not state_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
            saved = SearchState.load(state_path)
            if saved.scores.numel() != n:
                raise ValueError(f"the saved search covers {saved.scores.numel()} images, "
                                 f"this dataset has {n}")

        start = time.perf_counter()
        features = sharded_features(infer, bank, config.batch_size, device)
        _sync(device)
        timer.add("features", time.perf_counter() - start, n)
        data_clusters = config.n_clusters
        passes = self.method.encoder_passes(config)
        flops = forward_flops(infer, encoder.normalise(torch.as_tensor(bank[:1]).to(device),
                                                       dtype))
        # rank 0's measured speed: the plan's time estimate (information only) is the same
        speed = broadcast_object(n / max(timer.seconds["features"], 1e-9))
        config, plan = plan_search(config, n, passes, flops, speed,
                                   saved.run if saved is not None else None)
        start = time.perf_counter()
        clustering, labels, distances = self.method.fit_clustering(features, config)
        timer.add("clustering", time.perf_counter() - start)
        g = torch.Generator().manual_seed(config.seed)
        test_index = self.method.select_test_images(labels.cpu(), distances.cpu(),
                                                    config.test_set_size, g)
        test_labels = labels[test_index.to(labels.device)]

        def encode_assign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                out = infer(x).float()
            if not all_finite(out):
                raise ValueError(f"encoder {encoder.name} returned NaN/Inf features")
            return clustering.assign(out)

        run = {"method": self.method.name, "config": search_settings(config),
               "data_clusters": data_clusters,
               "clustering": fingerprint(labels.cpu(), test_index.cpu(), samples=n)}
        if saved is not None:
            _check_same_search(saved.run, run, state_path)
            log.info("resuming the search at round %d", saved.round)
            state = saved
        else:
            state = SearchState.start(labels, config.n_clusters, config.seed, run)
        timer = timer.into(state.stage_seconds, state.stage_images)
        top_maps = state.top_maps
        context = SearchContext(encoder, encode_assign, clustering, bank, labels, config, device,
                                dtype)
        # the sequential flip test's order of the test images: one permutation for the search
        test_order = torch.randperm(test_index.numel(),
                                    generator=torch.Generator().manual_seed(config.seed + 104729))

        def score_block(rows: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t0 = time.perf_counter()
            windows, maps = self.method.candidates(context, rows, gen)
            _sync(device)
            timer.add("candidates", time.perf_counter() - t0, rows.numel() * passes)
            t0 = time.perf_counter()
            triggers = crop_windows(bank, rows, windows, config.window)
            source = self.method.flip_sources(context, rows)
            flip = {"candidates_per_batch": config.candidates_per_batch, "generator": gen,
                    "source_clusters": source, "dtype": dtype,
                    "corner_positions": self.method.flip_corner_positions(size, config.window)}
            if config.flip_test == "sequential":
                scores, tested = sequential_flip_counts(
                    encode_assign, bank, test_index, test_labels, triggers, mean, std,
                    order=test_order, threshold=kth_best(state, config.topk_poisons),
                    keep=config.topk_poisons, error=config.flip_error, **flip)
                forwards = int(tested.sum())
            else:
                scores = flip_counts(encode_assign, bank, test_index, test_labels, triggers,
                                     mean, std, **flip)
                forwards = rows.numel() * test_index.numel()
            _sync(device)
            timer.add("flip_test", time.perf_counter() - t0, forwards)
            return scores, windows, maps

        def score_batch(rows: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
            # Blocks of search_block images dealt over the ranks; the best topk_poisons maps
            # and every map tied with the last of them (up to MAP_TIES_KEPT × topk_poisons)
            # kept: a method's ranking may break ties either way.
            return score_round(rows, gen, config.search_block, score_block, top_maps,
                               config.topk_poisons, MAP_TIES_KEPT)

        here = world()
        state = run_search(state, score_batch, samples_per_cluster=config.samples_per_cluster,
                           prune_fraction=config.prune_fraction,
                           aggregate=self.method.cluster_score, prune=self.method.prune,
                           seed=config.seed, checkpoint=state_path if here.main else None,
                           verbose=verbose, max_rounds=max_rounds)

        scores = state.scores
        ranking = self.method.rank(scores)
        k = min(config.topk_poisons, int(state.scored.sum()))
        if k == 0:
            raise ValueError("the search scored no image")
        topk = ranking[:k]
        windows = state.windows[topk]
        triggers = crop_windows(bank, topk, windows, config.window).cpu()
        maps = torch.stack([top_maps[i][1] if i in top_maps else torch.zeros(size, size)
                            for i in topk.tolist()])

        check: dict[str, object] = {}
        if config.check:
            start = time.perf_counter()
            check = backdoor_check(context, self.method, test_index, test_labels, topk,
                                   triggers)
            timer.add("check", time.perf_counter() - start,
                      test_index.numel() * (passes + 3 * k))

        exported = ranking[:min(config.exported_patches, int(state.scored.sum()))]
        patches = crop_windows(bank, exported, state.windows[exported], config.window).cpu()

        start = time.perf_counter()
        val_pos, bottom, pool = self.method.classifier_sets(scores, ranking, k, config)
        if pool.numel() == 0:
            raise ValueError("no image left to train the poison classifier on")
        classifier = config.classifier
        classifier_info: dict[str, object] = {"pool_size": int(pool.numel())}
        if classifier.pool_cleaning_rounds:
            cleaned = clean_pool(infer, bank, features, pool, triggers, classifier,
                                 torch.Generator().manual_seed(config.seed))
            classifier_info["pool_dropped"] = int(pool.numel() - cleaned.numel())
            pool = cleaned
        classifier_stages = StageFiles(checkpoint_dir, "classifier", {}, save_every_s)
        models, report = train_poison_classifier(bank, pool, triggers, val_pos, bottom,
                                                 classifier, mean, std, seed=config.seed,
                                                 verbose=verbose, stages=classifier_stages,
                                                 resume=resume)
        logits = sharded_logits(models, bank, mean, std, config.batch_size,
                                report.weights).cpu()
        margin = logits[:, 1] - logits[:, 0]
        threshold = 0.0
        if classifier.threshold == "otsu" and bool(margin.max() > margin.min()):
            threshold = otsu_threshold(margin)
        removed = margin > threshold
        if check and not check["backdoor"]:
            removed = torch.zeros_like(removed)
        timer.add("classifier", time.perf_counter() - start + report.resumed_seconds, n)
        classifier_info["threshold"] = threshold
        classifier_info.update(iterations=report.iterations, best_f1=report.best_f1,
                               ensemble_weights=report.weights)

        scored_ranking = ranking[state.scored[ranking]]
        result = DetectionResult(
            method=self.method.name, scores=scores, removed=removed, ranking=ranking, topk=topk,
            windows=windows, scored_ranking=scored_ranking.cpu(),
            ranked_windows=state.windows[scored_ranking].cpu(), maps=maps, triggers=triggers,
            cluster_labels=labels.cpu(),
            test_index=test_index.cpu(), top_patches=patches, margins=margin,
            top_images=bank[topk.to(bank.device)].cpu(),
            timings=timer.seconds, throughput=timer.throughput(), forwards=dict(timer.images),
            config=config.to_dict(),
            rounds=state.rounds, poison_probability=logits.softmax(1)[:, 1],
            classifier=classifier_info, plan=plan, check=check)
        if not check or check["backdoor"]:
            result.warnings = implausibility(margin, threshold, removed, topk,
                                             config.warn_removed_fraction)
        for warning in result.warnings:
            log.warning("%s: %s", self.method.name, warning)
        if ground_truth is not None:
            _score_against_truth(result, ground_truth, true_boxes, config.window)
        if true_targets is not None:
            result.per_target = per_target_detection(result.removed, result.topk, true_targets)
        result.checkpoint_files = classifier_stages.existing()
        self.result_ = result
        return self


ORDINARY_WINDOWS_PER_CANDIDATE = 2
"""The backdoor check pastes this many of the test images' own windows per top-k candidate."""
ORDINARY_QUANTILE = 0.75
"""The quantile of ordinary content's capture a candidate must exceed: the upper quartile, so
poison among the test images (whose own windows are then triggers) moves it only once it
exceeds a quarter of them — far above any published poison rate."""


def backdoor_check(context: SearchContext, method: DetectorMethod, test_index: torch.Tensor,
                   test_labels: torch.Tensor, topk: torch.Tensor, triggers: torch.Tensor
                   ) -> dict[str, object]:
    """Is there a backdoor at all? A duel between each top-k candidate and the test images'
    own content. ``capture``: the share of test images the candidate (uint8 ``k×3×w×w``,
    from top-k image ``topk``) pulls into one cluster d when pasted on them
    (``capture_shares``). ``ordinary``: the same share for ordinary content — 2k of the test
    images' own candidate windows (the method's ``candidates`` on them), each at the cluster
    *it* pulls most into — and ``pasting`` its upper quartile (``ORDINARY_QUANTILE``): what
    pasted content can do to this encoder without a backdoor (a weakly trained one lets a
    salient object pull most images into its class's cluster, or sends every patched image to
    one cluster). ``escape``: the share of the test images' own windows that pull the
    candidate's image out of its cluster when pasted on it. Content against content is an
    even match — capture ≈ what ordinary content reaches, escape > 0; a trigger the encoder
    learned overrides any content (capture ≈ its attack success rate, beyond ordinary content)
    and keeps its own image in the target's cluster (escape ≈ 0). ``statistic`` = the median
    over the top-k of capture − pasting − escape: about 0 without a backdoor, about 1 with one;
    ``backdoor`` when it reaches ``config.check_threshold`` (½, halfway). The median needs half
    of the top-k to be triggers, which a search that found the trigger gives; one freak
    candidate cannot pass the check. Streams of their own, seeded from ``config.seed``."""
    config = context.config
    size = context.bank.shape[-1]
    corners = method.flip_corner_positions(size, config.window)
    g = torch.Generator().manual_seed(config.seed + 7919)
    mean, std = context.encoder.mean, context.encoder.std
    shared = {"candidates_per_batch": config.candidates_per_batch, "generator": g,
              "dtype": context.dtype, "corner_positions": corners}
    before = test_labels.cpu().long()
    capture, destinations = capture_shares(pasted_clusters(
        context.encode_assign, context.bank, test_index, triggers, mean, std, **shared), before)
    test_windows, _ = method.candidates(context, test_index, g)
    own = crop_windows(context.bank, test_index, test_windows, config.window)
    picked = torch.randperm(own.shape[0], generator=g)[
        :ORDINARY_WINDOWS_PER_CANDIDATE * triggers.shape[0]]
    ordinary, _ = capture_shares(pasted_clusters(
        context.encode_assign, context.bank, test_index, own[picked.to(own.device)], mean, std,
        **shared), before)
    pasting = (float(torch.quantile(ordinary, ORDINARY_QUANTILE)) if ordinary.numel()
               else 0.0)
    own_clusters = context.labels[topk.to(context.labels.device)].cpu().long()
    escape = (pasted_clusters(context.encode_assign, context.bank, topk, own, mean, std,
                              **shared) != own_clusters).float().mean(0)
    duel = capture - pasting - escape
    statistic = float(duel.median()) if duel.numel() else 0.0
    backdoor = statistic >= config.check_threshold
    log.info("backdoor check: median capture − pasting − escape %.2f (threshold %.2f): %s",
             statistic, config.check_threshold, "backdoor" if backdoor else "no backdoor")
    return {"statistic": statistic, "threshold": config.check_threshold, "backdoor": backdoor,
            "capture": [round(float(v), 4) for v in capture],
            "pasting": round(pasting, 4),
            "ordinary": [round(float(v), 4) for v in ordinary],
            "escape": [round(float(v), 4) for v in escape],
            "destinations": destinations.tolist()}


def plan_search(config: Config, n_images: int, passes: int, flops_per_forward: float,
                images_per_second: float, saved_run: dict | None = None
                ) -> tuple[Config, dict[str, object]]:
    """The (scaled) ``config`` with its cluster count fitted to
    ``config.search_budget_tflop``, and the plan: clusters, images the search is expected to
    score (``expected_scored``), the encoder passes each costs (``passes`` for the candidates
    plus one per test image for the flip test), the search's expected forwards and TFLOPs at
    ``flops_per_forward`` (one image through the encoder) — which alone decide the cluster
    count, so the plan is the same on every machine — and, for information, the seconds that
    takes at ``images_per_second`` (the features stage's measured throughput). ``saved_run``: a
    resumed search's ``run`` record; its cluster count is kept when only the budget set it apart
    (the same count before the budget). Logged; warns when the time estimate exceeds 15 minutes
    and no budget limits the search."""
    per_image = passes + config.test_set_size
    budget = config.search_budget_tflop

    def estimate(clusters: int) -> tuple[int, int, float]:
        scored = expected_scored(clusters, config.samples_per_cluster, config.prune_fraction,
                                 n_images)
        return scored, scored * per_image, scored * per_image * flops_per_forward / 1e12

    clusters, reason = config.n_clusters, "the data"
    if saved_run and saved_run.get("data_clusters") == clusters:
        clusters, reason = int(saved_run["config"]["n_clusters"]), "the resumed search"
    elif budget is not None and estimate(clusters)[2] > budget:
        while clusters > 2 and estimate(clusters)[2] > budget:
            clusters = max(2, math.floor(clusters * 0.9))
        reason = f"the {budget:g} TFLOP search budget"
    scored, forwards, tflop = estimate(clusters)
    seconds = forwards / images_per_second
    plan = {"clusters": clusters, "chosen_by": reason, "expected_scored": scored,
            "encoder_passes_per_image": per_image, "expected_forwards": forwards,
            "gflop_per_forward": flops_per_forward / 1e9, "estimated_tflop": tflop,
            "budget_tflop": budget, "images_per_second": images_per_second,
            "estimated_seconds": seconds}
    log.info("search plan: %d clusters (set by %s), ~%d of %d images scored, %d forwards "
             "(%.2f TFLOP), ~%.0f s at %.0f images/s", clusters, reason, scored, n_images,
             forwards, tflop, seconds, images_per_second)
    if seconds > 900 and budget is None:
        log.warning("the search is estimated to take %.0f min; set search_budget_tflop (or "
                    "fewer n_clusters) to bound it", seconds / 60)
    return replace(config, n_clusters=clusters), plan


def implausibility(margins: torch.Tensor, threshold: float, removed: torch.Tensor,
                   topk: torch.Tensor, max_removed_fraction: float) -> list[str]:
    """What makes a classification implausible, one sentence each: more than
    ``max_removed_fraction`` of the images removed; a decision threshold at a negative margin
    (images the classifier itself rates clean are removed); fewer than half of the search's
    ``topk`` removed (the classifier disagrees with the search). ``margins`` float ``N``,
    ``removed`` bool ``N``, ``topk`` int64 ``k``."""
    warnings = []
    share = float(removed.double().mean())
    if share > max_removed_fraction:
        warnings.append(f"{share:.1%} of the images removed, above the "
                        f"{max_removed_fraction:.0%} a poisoning attack plausibly reaches")
    if threshold < 0 and bool((removed & (margins < 0)).any()):
        warnings.append(f"the decision threshold lies at margin {threshold:.2f} < 0: images the "
                        "classifier rates clean are removed")
    agreed = int(removed[topk].sum())
    if topk.numel() and 2 * agreed < topk.numel():
        warnings.append(f"only {agreed} of the search's top {topk.numel()} are removed: the "
                        "classifier disagrees with the search")
    return warnings


def kth_best(state: SearchState, k: int) -> float:
    """The ``k``-th best score among the images ``state`` has scored (−inf with fewer): an
    image whose full flip score is below it cannot end in the top ``k``, since the ``k``-th
    best only rises as the search scores more."""
    scored = state.scores[state.scored]
    return float(scored.topk(k).values[-1]) if scored.numel() >= k else -math.inf


def _score_against_truth(result: DetectionResult, truth: torch.Tensor,
                         boxes: torch.Tensor | None, window: int) -> None:
    truth = torch.as_tensor(truth).bool().cpu()
    if truth.numel() != result.scores.numel():
        raise ValueError(f"ground truth has {truth.numel()} entries for "
                         f"{result.scores.numel()} images")
    result.metrics = detection_metrics(result.removed, truth, result.margins)
    result.topk_accuracy = float(truth[result.topk].double().mean())
    if boxes is not None:
        boxes = torch.as_tensor(boxes).long().cpu()
        found = torch.cat([result.windows, torch.full_like(result.windows, window)], 1)
        poisoned = truth[result.topk]
        iou = box_iou(found, boxes[result.topk])
        result.trigger_scores = {
            "topk_trigger_overlap": float((iou > 0).double().mean()),
            "topk_trigger_iou": float(iou[poisoned].mean()) if bool(poisoned.any()) else 0.0,
            "topk_catch_rate": catch_rate(found, boxes[result.topk])}
        result.retrieval_curve = retrieval_curve(result, boxes, window)


RETRIEVAL_DEPTHS = (5, 10, 20, 50, 100, 200, 500)
"""The search depths of the PoisonCAM paper's Fig. 4 (top-5 to top-500)."""


def retrieval_curve(result: DetectionResult, boxes: torch.Tensor, window: int) -> list[dict]:
    """Acc (any part of the true trigger in the window), IoU and CR (the share of the true
    trigger inside the window) of the ranking's top ``k`` windows, for each
    ``RETRIEVAL_DEPTHS`` depth the search scored that many images for (and its full depth);
    clean images count 0 in all three, as in the paper's Fig. 4."""
    images, windows = result.scored_ranking, result.ranked_windows
    depths = [d for d in RETRIEVAL_DEPTHS if d < images.numel()] + [images.numel()]
    curve = []
    for depth in depths if images.numel() else []:
        found = torch.cat([windows[:depth], torch.full_like(windows[:depth], window)], 1)
        true = boxes[images[:depth]]
        curve.append({"k": depth, "acc": window_accuracy(found, true),
                      "iou": float(box_iou(found, true).mean()),
                      "cr": catch_rate(found, true)})
    return curve

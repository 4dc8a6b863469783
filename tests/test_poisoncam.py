"""PoisonCAM stages on tiny inputs with known answers, and the pipeline end to end.

``trigger_encoder`` is built so that a magenta patch decides the cluster: its features are the
mean colour (×0.1) plus 2.5 when at least half of a 4×4 patch's pixels are magenta, so clean
images cluster by colour, patched ones sit far away along the last axis, and exactly the masks
that hide most of the patch move a patched image out of its cluster.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fastbd.detection import classifier as classifier_module
from fastbd.detection.classifier import (
    clean_pool,
    fit_pool_model,
    otsu_threshold,
    paste_triggers,
)
from fastbd.detection.flip import crop_windows, flip_counts, select_test_images
from fastbd.detection.pipeline import implausibility, plan_search
from fastbd.detection.search import SearchState, drop_count, expected_scored, run_search
from fastbd.eval.metrics import auroc, average_precision
from fastbd.models.encoders import Encoder
from fastbd.ops import window_masks
from fastbd.patchsearch import PatchSearch
from fastbd.poisoncam import ClassifierConfig, Config, PoisonCAM, detect, preset
from fastbd.poisoncam.masking import attention_maps, outlier_scores, window_coverage
from fastbd.registry import detector
from fastbd.storage import StageFiles

from testutil import MAGENTA, MEAN, STD, cuda


class TriggerNet(nn.Module):
    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.5))
        self.nan = nan

    def forward(self, x):
        pixels = x * 0.25 + 0.5  # back to [0, 1]
        magenta = ((pixels[:, 0] > 0.9) & (pixels[:, 1] < 0.1) & (pixels[:, 2] > 0.9)).float()
        present = (magenta.sum((1, 2)) >= 8).float()
        out = torch.cat([0.1 * pixels.mean((2, 3)), self.scale * present[:, None]], 1)
        return out * float("nan") if self.nan else out


def trigger_encoder(nan: bool = False) -> Encoder:
    return Encoder(TriggerNet(nan), 4, 16, MEAN, STD, name="trigger-net")


def world(gen, n=200, poisoned=20, size=16, side=4):
    """Random-coloured blobs, ``poisoned`` of them with a magenta side×side patch."""
    images = (torch.rand(n, 3, 1, 1, generator=gen) * 150).to(torch.uint8).expand(
        n, 3, size, size).clone()
    images += torch.randint(0, 40, images.shape, generator=gen, dtype=torch.uint8)
    truth = torch.zeros(n, dtype=torch.bool)
    rows = torch.randperm(n, generator=gen)[:poisoned]
    truth[rows] = True
    boxes = torch.full((n, 4), -1, dtype=torch.long)
    for r in rows.tolist():
        y, x = torch.randint(0, size - side + 1, (2,), generator=gen).tolist()
        images[r, :, y:y + side, x:x + side] = MAGENTA[:, None, None]
        boxes[r] = torch.tensor([y, x, side, side])
    return images, truth, boxes


def test_outlier_scores():
    labels = torch.tensor([[3, 3, 5, 3]])
    distances = torch.tensor([[0.1, 0.3, 0.9, 0.2]])
    torch.testing.assert_close(outlier_scores(labels, distances),
                               torch.tensor([[0.0, 0.25, 1.0, 0.125]]))
    flat = outlier_scores(torch.tensor([[1, 1]]), torch.tensor([[0.5, 0.5]]))
    assert torch.equal(flat, torch.zeros(1, 2))


def test_window_coverage_matches_rendered_masks(gen):
    positions = torch.randint(-30, 60, (3, 7, 2), generator=gen)
    weights = torch.rand(3, 7, generator=gen)
    got = window_coverage(positions, weights, 5, 13)
    masks = window_masks(positions.reshape(-1, 2), 5, 13).view(3, 7, 13, 13).float()
    torch.testing.assert_close(got, (masks * weights[:, :, None, None]).sum(1), atol=1e-5,
                               rtol=0)
    interval = attention_maps(positions, weights, 6, 13, "interval", block=2)
    rendered = window_masks(positions.reshape(-1, 2), 6, 13, strategy="interval",
                            block=2).view(3, 7, 13, 13).float()
    count = rendered.sum(1)
    expected = torch.where(count > 0, (rendered * weights[:, :, None, None]).sum(1) /
                           count.clamp_min(1e-12), torch.zeros_like(count))
    torch.testing.assert_close(interval, expected)


def _clustering_for(images, encoder):
    from fastbd.detection.clustering import ClusteringModel
    from fastbd.models.encoders import embed_images

    features = embed_images(encoder, images)
    return ClusteringModel.fit(features, 6, 10, 0)


def test_candidate_window_covers_the_patch(gen):
    from fastbd.poisoncam.masking import candidate_windows

    images, truth, boxes = world(gen)
    encoder = trigger_encoder()
    clustering, _, _ = _clustering_for(images, encoder)

    def encode_assign(x):
        return clustering.assign(encoder(x))

    rows = torch.nonzero(truth).flatten()
    out = candidate_windows(encode_assign, images, rows, MEAN, STD, n_masks=256, window=4,
                            strategy="full", block=2, fill=0.0, batch_size=256, generator=gen)
    overlap = [(abs(int(wy) - int(b[0])) < 4 and abs(int(wx) - int(b[1])) < 4)
               for (wy, wx), b in zip(out.windows.tolist(), boxes[rows], strict=True)]
    assert all(overlap)
    from fastbd.eval.metrics import box_iou

    found = torch.cat([out.windows, torch.full_like(out.windows, 4)], 1)
    assert float(box_iou(found, boxes[rows]).mean()) >= 0.5


def test_flip_score_counts_exactly(gen):
    images, truth, boxes = world(gen)
    encoder = trigger_encoder()
    clustering, labels, _ = _clustering_for(images, encoder)

    def encode_assign(x):
        return clustering.assign(encoder(x))

    tests = torch.nonzero(~truth).flatten()[:30]
    test_labels = labels[tests]
    poisoned_row = int(torch.nonzero(truth)[0])
    clean_row = int(torch.nonzero(~truth)[0])
    triggers = torch.cat([
        crop_windows(images, torch.tensor([poisoned_row]), boxes[poisoned_row:poisoned_row + 1,
                                                                  :2], 4),
        crop_windows(images, torch.tensor([clean_row]), torch.tensor([[0, 0]]), 4)])
    replay = torch.Generator().set_state(gen.get_state())
    scores = flip_counts(encode_assign, images, tests, test_labels, triggers, MEAN, STD,
                         candidates_per_batch=1, generator=gen)
    # Oracle: the same positions, pasted by hand one image at a time.
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    for c in range(2):
        corners = torch.randint(0, 16 - 4 + 1, (30, 2), generator=replay)
        flips = 0
        for t, (y, x) in zip(tests.tolist(), corners.tolist(), strict=True):
            canvas = images[t].clone()
            canvas[:, y:y + 4, x:x + 4] = triggers[c]
            label, _ = encode_assign(((canvas.float() / 255 - mean) / std)[None])
            flips += int(label[0] != labels[t])
        assert int(scores[c]) == flips
    assert int(scores[0]) == 30  # the patch moves every clean image out of its cluster


def test_test_set_spreads_over_clusters(gen):
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 1)
    distances = torch.rand(9, generator=gen)
    chosen = select_test_images(labels, distances, 6, gen)
    per_cluster = torch.bincount(labels[chosen], minlength=3).tolist()
    assert per_cluster == [3, 2, 1] or per_cluster == [2, 3, 1]
    closest0 = int(torch.argsort(distances[:5])[0])
    assert closest0 in chosen.tolist()
    assert select_test_images(labels, distances, 2, gen).numel() == 2  # one per cluster


@pytest.mark.parametrize("remaining,expected", [(1, 1), (3, 1), (4, 1), (8, 2), (10, 2),
                                                (1000, 250)])
def test_drop_count(remaining, expected):
    assert drop_count(remaining, 0.25) == expected


def _fake_scorer(values):
    def score(rows, gen):
        return values[rows], torch.zeros(rows.numel(), 2, dtype=torch.long)
    return score


def test_search_scores_and_prunes_to_the_end(gen):
    labels = torch.arange(12) % 4  # 4 clusters of 3
    values = torch.arange(12, dtype=torch.float64)
    state = run_search(SearchState.start(labels, 4, seed=1), _fake_scorer(values),
                       samples_per_cluster=2, prune_fraction=0.25, aggregate="sum", seed=1,
                       verbose=False)
    assert not state.remaining
    assert [r["remaining"] for r in state.rounds] == [3, 2, 1, 0]
    # Round 0: two of three members of all 4 clusters; round 1: the last member of the 3 left;
    # then nothing new, one cluster dropped per round until none remains.
    assert [r["scored"] for r in state.rounds] == [8, 3, 0, 0]
    assert bool((state.scores[state.scored] == values[state.scored]).all())
    assert bool((state.scores[~state.scored] == 0).all())
    for c in range(4):
        members = state.members[c][state.scored[state.members[c]]]
        assert float(state.cluster_scores[c]) == float(values[members].sum())


def test_search_resume_equals_uninterrupted(tmp_path, gen):
    labels = torch.randint(0, 6, (60,), generator=gen)
    values = torch.rand(60, generator=gen, dtype=torch.float64)
    full = run_search(SearchState.start(labels, 6, 3), _fake_scorer(values),
                      samples_per_cluster=2, prune_fraction=0.25, aggregate="max", seed=3,
                      verbose=False)
    path = tmp_path / "state.pt"
    run_search(SearchState.start(labels, 6, 3), _fake_scorer(values), samples_per_cluster=2,
               prune_fraction=0.25, aggregate="max", seed=3, checkpoint=path, verbose=False,
               max_rounds=2)
    resumed = run_search(SearchState.load(path), _fake_scorer(values), samples_per_cluster=2,
                         prune_fraction=0.25, aggregate="max", seed=3, verbose=False)
    assert torch.equal(full.scores, resumed.scores) and full.rounds == resumed.rounds


def small_config(**overrides):
    base = dict(n_clusters=20, n_masks=64, window=56, test_set_size=40, topk_poisons=8,
                candidates_per_batch=8, batch_size=256,
                classifier=ClassifierConfig(n_models=2, iterations=300, batch_size=32, width=8,
                                            paste_size=(56, 84), paste_margin=0))
    base.update(overrides)
    return Config(**base)


@pytest.mark.slow
def test_the_sequential_flip_test_keeps_the_top_with_fewer_forwards():
    images, truth, boxes = world(torch.Generator().manual_seed(0))
    runs = {mode: detect(trigger_encoder(), images, small_config(flip_test=mode),
                         ground_truth=truth, verbose=False)
            for mode in ("exhaustive", "sequential")}
    exhaustive, sequential = runs["exhaustive"], runs["sequential"]
    scored = exhaustive.scored_ranking.numel()
    # every stage's forwards recorded: the exhaustive flip test is scored images × test images
    assert exhaustive.forwards["flip_test"] == scored * 40
    assert exhaustive.forwards["candidates"] == scored * 64
    assert exhaustive.summary()["forwards"] == exhaustive.forwards
    assert sequential.config["flip_test"] == "sequential"
    assert torch.equal(sequential.topk, exhaustive.topk)
    assert torch.equal(sequential.scores[sequential.topk], exhaustive.scores[exhaustive.topk])
    assert sequential.forwards["flip_test"] < exhaustive.forwards["flip_test"]
    assert sequential.metrics.recall == exhaustive.metrics.recall


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pipeline_finds_the_poisons(tmp_path, precision):
    # a fixed world: on 1 of 25 random worlds Otsu's threshold cut into the poisoned images'
    # long margin tail (recall 0.90 at AUROC 1.0; docs/methods.md, "The poison classifier")
    images, truth, boxes = world(torch.Generator().manual_seed(0))
    targets = torch.full((truth.numel(),), -1)  # as if every other poison had another target
    targets[truth] = torch.tensor([3, 7]).repeat(int(truth.sum()))[:int(truth.sum())]
    result = detect(trigger_encoder(), images, small_config(precision=precision),
                    ground_truth=truth, true_boxes=boxes, true_targets=targets, verbose=False)
    assert result.config["precision"] == precision
    per_target = result.summary()["per_target"]
    assert set(per_target) == {"3", "7"} and per_target["3"]["poisoned"] == 10
    assert per_target["3"]["topk_share"] + per_target["7"]["topk_share"] == pytest.approx(
        result.topk_accuracy)
    assert result.topk_accuracy == 1.0
    assert result.trigger_scores["topk_trigger_overlap"] == 1.0
    # the retrieval curve (the paper's Fig. 4): Acc, IoU, CR of the ranking's top k windows
    curve = {row["k"]: row for row in result.summary()["retrieval_curve"]}
    scored = result.scored_ranking
    assert list(curve)[-1] == scored.numel() and list(curve) == sorted(curve)
    assert torch.equal(scored[:result.topk.numel()], result.topk)
    k = result.topk.numel()
    if k in curve:
        assert curve[k]["acc"] == result.trigger_scores["topk_trigger_overlap"]
        assert curve[k]["cr"] == pytest.approx(result.trigger_scores["topk_catch_rate"])
    window = result.config["window"]
    for depth, row in curve.items():  # by hand: pixel counts of each true box in its window
        caught, overlapping = [], []
        for image, (y, x) in zip(scored[:depth].tolist(),
                                 result.ranked_windows[:depth].tolist(), strict=True):
            ty, tx, th, tw = boxes[image].tolist()
            inside = (max(0, min(y + window, ty + th) - max(y, ty))
                      * max(0, min(x + window, tx + tw) - max(x, tx)))
            caught.append(inside / (th * tw) if th * tw else 0.0)
            overlapping.append(inside > 0)
        assert row["cr"] == pytest.approx(sum(caught) / depth)
        assert row["acc"] == pytest.approx(sum(overlapping) / depth)
    assert bool((result.maps.flatten(1).amax(1) > 0).all())  # every top image's map kept
    assert result.metrics.recall >= 0.95 and result.metrics.precision >= 0.7
    assert result.metrics.auroc == pytest.approx(auroc(result.margins, truth))
    assert result.metrics.auprc == pytest.approx(average_precision(result.margins, truth))
    assert result.metrics.auroc >= 0.95 and result.metrics.auprc >= 0.8
    assert result.warnings == []
    assert set(result.timings) >= {"features", "clustering", "candidates", "flip_test",
                                   "classifier"}
    lines = [f"img{i}.png {i % 3}" for i in range(len(truth))]
    result.save(tmp_path, file_list_lines=lines, truth=truth)
    assert np.array_equal(np.load(tmp_path / "removed.npy"), result.removed.numpy())
    assert np.allclose(np.load(tmp_path / "scores.npy"), result.scores.numpy())
    assert np.allclose(np.load(tmp_path / "margins.npy"), result.margins.numpy())
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["warnings"] == [] and saved["metrics"]["auprc"] == result.metrics.auprc
    assert saved["plan"]["clusters"] == result.config["n_clusters"]
    kept = (tmp_path / "filtered.txt").read_text().splitlines()
    assert kept == [line for line, r in zip(lines, result.removed.tolist(), strict=True)
                    if not r]
    for png in ("top_triggers.png", "attention_maps.png", "score_distribution.png",
                "retrieval_curve.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "retrieval_curve.png" in (tmp_path / "report.md").read_text()


def test_bad_inputs(gen):
    encoder = trigger_encoder()
    with pytest.raises(ValueError, match="empty"):
        detect(encoder, torch.zeros(0, 3, 16, 16, dtype=torch.uint8), small_config())
    with pytest.raises(ValueError, match="topk_poisons"):
        detect(encoder, torch.zeros(10, 3, 16, 16, dtype=torch.uint8), small_config())
    with pytest.raises(ValueError, match="uint8"):
        detect(encoder, torch.zeros(10, 3, 16, 16), small_config())
    images, _, _ = world(gen, n=60, poisoned=5)
    with pytest.raises(ValueError, match="NaN"):
        detect(trigger_encoder(nan=True), images, small_config(), verbose=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        PoisonCAM(small_config()).fit(encoder, images, resume=True, verbose=False)


def test_detector_resume_equals_uninterrupted_and_refuses_another_search(gen, tmp_path):
    images, _, _ = world(gen, n=80, poisoned=8)
    config = small_config(n_clusters=8, test_set_size=20, n_masks=16,
                          classifier=ClassifierConfig(n_models=1, iterations=20, batch_size=16,
                                                      width=4, paste_size=(56, 84),
                                                      paste_margin=0))
    full = PoisonCAM(config).fit(trigger_encoder(), images, verbose=False).result_
    PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path, max_rounds=1,
                          verbose=False)
    saved = (tmp_path / "search_state.pt").read_bytes()
    with pytest.raises(ValueError, match="unfinished search.*--resume"):
        PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path, verbose=False)
    assert (tmp_path / "search_state.pt").read_bytes() == saved  # not overwritten
    resumed = PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path,
                                    resume=True, verbose=False).result_
    assert torch.equal(full.scores, resumed.scores) and len(full.rounds) > 1
    assert torch.equal(full.removed, resumed.removed)
    with pytest.raises(ValueError, match=r"config\.n_masks"):
        PoisonCAM(replace(config, n_masks=8)).fit(trigger_encoder(), images,
                                                  checkpoint_dir=tmp_path, resume=True,
                                                  verbose=False)
    with pytest.raises(ValueError, match="method"):
        PatchSearch(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path,
                                            resume=True, verbose=False)
    shuffled = images[torch.randperm(len(images), generator=gen)]
    with pytest.raises(ValueError, match="clustering"):
        PoisonCAM(config).fit(trigger_encoder(), shuffled, checkpoint_dir=tmp_path,
                              resume=True, verbose=False)
    other_classifier = replace(config, batch_size=64,
                               classifier=replace(config.classifier, iterations=10))
    PoisonCAM(other_classifier).fit(trigger_encoder(), images, checkpoint_dir=tmp_path,
                                    resume=True, verbose=False)


def test_detector_resumes_an_interrupted_classifier(gen, monkeypatch, tmp_path):
    images, _, _ = world(gen, n=80, poisoned=8)
    config = small_config(n_clusters=8, test_set_size=20, n_masks=16,
                          classifier=ClassifierConfig(n_models=2, iterations=20, batch_size=16,
                                                      width=4, paste_size=(56, 84),
                                                      paste_margin=0, patience=50))
    full = PoisonCAM(config).fit(trigger_encoder(), images, verbose=False).result_
    drawn = []

    def interrupted(*args):
        if len(drawn) == 25:
            raise KeyboardInterrupt
        drawn.append(1)
        return MAKE_BATCH(*args)

    monkeypatch.setattr(classifier_module, "make_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path, verbose=False,
                              save_every_s=0.0)
    assert (tmp_path / "classifier-member1.pt").is_file()
    drawn.clear()
    resumed = PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path,
                                    resume=True, verbose=False).result_
    assert len(drawn) == 15  # member 1 was finished, member 2 continues after 5 steps
    assert torch.equal(full.removed, resumed.removed)
    assert torch.equal(full.poison_probability, resumed.poison_probability)
    # an interrupt between building the result and saving it loses nothing: a rerun trains none
    assert len(list(tmp_path.glob("classifier-*"))) == 2
    drawn.clear()
    again = PoisonCAM(config).fit(trigger_encoder(), images, checkpoint_dir=tmp_path,
                                  resume=True, verbose=False).result_
    assert not drawn and torch.equal(again.removed, full.removed)
    # the interrupted run's stage time stays counted: the search ran once, in the first run
    assert again.timings["search"] == resumed.timings["search"] > 0
    assert again.timings["classifier"] >= resumed.timings["classifier"] * 0.5
    again.save(tmp_path / "result")
    assert not list(tmp_path.glob("classifier-*"))  # removed once the result is saved


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
@pytest.mark.parametrize("method", ["poisoncam", "patchsearch"])
def test_images_left_in_host_memory_give_the_same_result(gen, method, device):
    from fastbd.models import small_encoder

    images, truth, _ = world(gen, n=80, poisoned=8)
    # PatchSearch needs a Grad-CAM layer: a small random CNN
    encoder = trigger_encoder() if method == "poisoncam" else small_encoder(4, 16, seed=1)
    config = small_config(n_clusters=8, test_set_size=20, n_masks=16,
                          classifier=ClassifierConfig(n_models=1, iterations=20, batch_size=16,
                                                      width=4, paste_size=(56, 84),
                                                      paste_margin=0))
    results = [detector(method, replace(config, bank_placement=placement)).fit(
        encoder, images, device=device, ground_truth=truth, verbose=False).result_
        for placement in ("device", "host")]
    resident, streamed = results
    for name in ("scores", "removed", "windows", "triggers", "poison_probability"):
        assert torch.equal(getattr(resident, name), getattr(streamed, name)), name
    assert streamed.config["bank_placement"] == "host"


def test_precision_setting():
    assert Config().for_device(torch.device("cpu")).precision == "fp32"
    assert Config().for_device(torch.device("cuda")).precision == "bf16"
    assert Config(precision="bf16").for_device(torch.device("cpu")).precision == "bf16"
    assert Config(precision="fp32").for_device(torch.device("cuda")).precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        Config(precision="fp16")
    encoder = trigger_encoder()
    assert encoder.dtype == torch.float32
    assert encoder.to(torch.bfloat16).normalise(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
                                                ).dtype == torch.bfloat16


def test_presets():
    assert preset("paper") == Config()
    fast = preset("fast")
    assert fast.classifier.n_models == 1 and fast.n_masks < Config().n_masks
    fast.classifier.n_models = 7
    assert preset("fast").classifier.n_models == 1  # a copy, not the registry's instance
    with pytest.raises(ValueError, match="known: paper, fast"):
        preset("quick")


def feature_world(gen):
    """The magenta world's images, its encoder's normalised features and a pool holding 12
    poisoned images among 150, plus magenta triggers as the search would crop them."""
    images, truth, _ = world(gen, n=150, poisoned=12)
    encoder = trigger_encoder().eval()
    with torch.no_grad():
        features = torch.nn.functional.normalize(encoder(encoder.normalise(images)), dim=1)
    triggers = MAGENTA[None, :, None, None].expand(3, 3, 4, 4).clone()
    return images, truth, encoder, features, triggers


def test_clean_pool_drops_the_unscored_poisons(gen):
    images, truth, encoder, features, triggers = feature_world(gen)
    pool = torch.arange(len(truth))
    config = ClassifierConfig(feature_samples=400, paste_size=(4, 6), paste_margin=0,
                              pool_cleaning_rounds=1, pool_cleaning_fraction=0.1)
    cleaned = clean_pool(encoder, images, features, pool, triggers, config,
                         torch.Generator().manual_seed(0))
    assert cleaned.numel() == 150 - 15
    assert not truth[cleaned].any()  # the 12 poisoned rows are among the 15 dropped
    model = fit_pool_model(encoder, images, features, pool, triggers, config,
                           torch.Generator().manual_seed(0))
    with torch.no_grad():
        margin = model(features) @ torch.tensor([-1.0, 1.0])
    assert margin[truth].min() > 0 > margin[~truth].max()
    unchanged = clean_pool(encoder, images, features, pool, triggers,
                           replace(config, pool_cleaning_rounds=0),
                           torch.Generator().manual_seed(0))
    assert torch.equal(unchanged, pool)


def brute_force_otsu(values):
    ordered = sorted(values)
    best, threshold = -1.0, None
    for i in range(len(ordered) - 1):
        if ordered[i] == ordered[i + 1]:
            continue
        low, high = ordered[:i + 1], ordered[i + 1:]
        spread = len(low) * len(high) * (np.mean(low) - np.mean(high)) ** 2
        if spread > best:
            best, threshold = spread, (ordered[i] + ordered[i + 1]) / 2
    return threshold


@pytest.mark.parametrize("n", [2, 3, 17, 250])
def test_otsu_threshold_matches_brute_force(gen, n):
    values = torch.cat([torch.randn(n, generator=gen), 6 + torch.randn(n // 5 + 1,
                                                                       generator=gen)])
    values = torch.cat([values, values[:3]])  # ties
    assert otsu_threshold(values) == pytest.approx(brute_force_otsu(values.double().tolist()))


def test_otsu_threshold_separates_a_gap_and_rejects_flat_input():
    values = torch.tensor([0.1, -0.3, 0.0, 0.2, 9.0, 8.5, -0.1])
    assert 0.2 < otsu_threshold(values) < 8.5
    with pytest.raises(ValueError, match="two distinct"):
        otsu_threshold(torch.ones(5))
    with pytest.raises(ValueError, match="two distinct"):
        otsu_threshold(torch.empty(0))


def test_expected_scored_counts_the_rounds():
    # 8 clusters, 2 each: rounds of 8, 6 (drop 2), 5, 4, 3, 2, 1 remaining clusters
    assert expected_scored(8, 2, 0.25, 10_000) == 2 * (8 + 6 + 5 + 4 + 3 + 2 + 1)
    assert expected_scored(8, 2, 0.25, 20) == 20


def test_search_plan_fits_the_budget_and_keeps_a_resumed_search(caplog):
    config = Config(n_clusters=400, n_masks=64, test_set_size=150)
    gflop = 8e9  # FLOPs per forward
    same, plan = plan_search(config, 4000, 64, gflop, images_per_second=500.0)
    forwards = expected_scored(400, 2, 0.25, 4000) * 214
    assert same.n_clusters == 400 and plan["chosen_by"] == "the data"
    assert plan["expected_forwards"] == forwards
    assert plan["estimated_tflop"] == pytest.approx(forwards * gflop / 1e12)
    assert plan["estimated_seconds"] == pytest.approx(forwards / 500.0)
    assert "set search_budget_tflop" in caplog.text  # ~29 min, no budget
    budget = replace(config, search_budget_tflop=1000.0)
    budgeted, plan = plan_search(budget, 4000, 64, gflop, 500.0)
    assert plan["estimated_tflop"] <= 1000.0 < plan_search(
        replace(config, n_clusters=budgeted.n_clusters + 10), 4000, 64, gflop, 500.0)[1][
            "estimated_tflop"] * 1.3
    assert 2 <= budgeted.n_clusters < 400 and "1000 TFLOP" in plan["chosen_by"]
    # the machine's speed changes the time estimate, never the search
    slower = plan_search(budget, 4000, 64, gflop, 50.0)
    assert slower[0] == budgeted and slower[1]["estimated_seconds"] == 10 * plan[
        "estimated_seconds"]
    saved = {"data_clusters": 400, "config": {"n_clusters": 350}}
    resumed, plan = plan_search(budget, 4000, 64, gflop, 500.0, saved)
    assert resumed.n_clusters == 350 and plan["chosen_by"] == "the resumed search"
    other_data = plan_search(config, 4000, 64, gflop, 500.0, {**saved, "data_clusters": 300})[0]
    assert other_data.n_clusters == 400  # another data rule: a new search (refused on resume)


def test_forward_flops_counts_a_known_convolution():
    from fastbd.models.encoders import forward_flops

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: 8 outputs × 3×3×3 weights at each of 16×16 positions, per image
    assert forward_flops(conv, torch.randn(5, 3, 16, 16)) == 2 * 8 * 27 * 256


def test_implausible_results_are_flagged():
    margins = torch.tensor([5.0, 4.0, -0.5, -0.4, -3.0, -3.0, -3.0, -3.0, -3.0, -3.0])
    removed = margins > 0
    assert implausibility(margins, 0.0, removed, torch.tensor([0, 1]), 0.2) == []
    wide = margins > -0.6
    warnings = implausibility(margins, -0.6, wide, torch.tensor([0, 1]), 0.2)
    assert len(warnings) == 2
    assert "40.0% of the images removed" in warnings[0] and "margin -0.60" in warnings[1]
    disagree = implausibility(margins, 0.0, removed, torch.tensor([0, 4, 5]), 0.5)
    assert disagree == ["only 1 of the search's top 3 are removed: the classifier disagrees "
                        "with the search"]


def test_pasted_triggers_land_inside_the_margin(gen):
    images = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    config = ClassifierConfig(paste_size=(3, 5), paste_margin=2)
    out = paste_triggers(images, torch.arange(6), MAGENTA[None, :, None, None].expand(
        1, 3, 4, 4).contiguous(), config, torch.Generator().manual_seed(1))
    painted = out.amax(1) > 0
    sides = painted.sum((1, 2)).float().sqrt()
    assert ((sides >= 3) & (sides <= 5)).all()
    assert not painted[:, :2].any() and not painted[:, -2:].any()
    assert not painted[:, :, :2].any() and not painted[:, :, -2:].any()


@pytest.mark.parametrize("history, expected", [("flat", 40), ("rising", 100)])
def test_classifier_early_stopping(gen, monkeypatch, history, expected):
    images, truth, _ = world(gen, n=60, poisoned=6)
    values = iter(range(1000))
    monkeypatch.setattr(classifier_module, "_f1", lambda logits, labels: 0.5 if history ==
                        "flat" else next(values) / 100)
    config = ClassifierConfig(n_models=1, iterations=100, batch_size=8, width=4, val_every=10,
                              patience=4, paste_size=(4, 6), paste_margin=0)
    pois, clean = torch.nonzero(truth).flatten(), torch.nonzero(~truth).flatten()
    _, report = classifier_module.train_poison_classifier(
        images, clean, MAGENTA[None, :, None, None].expand(1, 3, 4, 4).contiguous(), pois,
        clean[:6], config, MEAN, STD, verbose=False)
    assert report.iterations == [expected]


MAKE_BATCH = classifier_module.make_batch


def _classifier_run(gen, config, monkeypatch, *, stop_after=None, **kwargs):
    """Train on a fixed small world; ``stop_after`` batches, raise KeyboardInterrupt. Returns
    (models, report, batches drawn)."""
    images, truth, _ = world(torch.Generator().manual_seed(5), n=60, poisoned=6)
    pois, clean = torch.nonzero(truth).flatten(), torch.nonzero(~truth).flatten()
    drawn = []

    def counted(*args):
        if stop_after is not None and len(drawn) == stop_after:
            raise KeyboardInterrupt
        drawn.append(1)
        return MAKE_BATCH(*args)

    monkeypatch.setattr(classifier_module, "make_batch", counted)
    models, report = classifier_module.train_poison_classifier(
        images, clean, MAGENTA[None, :, None, None].expand(1, 3, 4, 4).contiguous(), pois,
        clean[:6], config, MEAN, STD, verbose=False, seed=3, **kwargs)
    return models, report, len(drawn)


def _same_weights(a, b):
    return len(a) == len(b) and all(
        all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), n.state_dict().values(),
                                              strict=True))
        for m, n in zip(a, b, strict=True))


@pytest.mark.parametrize("stop_after", [7, 30, 33])
def test_classifier_resume_equals_uninterrupted(gen, monkeypatch, tmp_path, stop_after):
    # members of 30 steps: interrupted inside member 1, right after it, and inside member 2
    config = ClassifierConfig(n_models=2, iterations=30, batch_size=8, width=4, val_every=5,
                              patience=50, paste_size=(4, 6), paste_margin=0)
    full, full_report, _ = _classifier_run(gen, config, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _classifier_run(gen, config, monkeypatch, stop_after=stop_after,
                        stages=StageFiles(tmp_path, "classifier", {}, 0.0))
    resumed, report, drawn = _classifier_run(gen, config, monkeypatch,
                                             stages=StageFiles(tmp_path, "classifier", {}),
                                             resume=True)
    assert drawn == 60 - stop_after  # a finished member is loaded, not retrained
    assert _same_weights(full, resumed)
    assert (report.iterations, report.best_f1) == (full_report.iterations, full_report.best_f1)
    assert report.resumed_seconds > 0 and full_report.resumed_seconds == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classifier-member0.pt", "classifier-member1.pt"]
    _, _, drawn = _classifier_run(gen, config, monkeypatch,
                                  stages=StageFiles(tmp_path, "classifier", {}))
    assert drawn == 60  # without resume every member starts afresh
    other = replace(config, lr=0.02)
    fresh, _, _ = _classifier_run(gen, other, monkeypatch)
    changed, _, drawn = _classifier_run(gen, other, monkeypatch,
                                        stages=StageFiles(tmp_path, "classifier", {}),
                                        resume=True)
    assert drawn == 60 and _same_weights(fresh, changed)  # other settings: states ignored


def test_classifier_resume_keeps_early_stopped_members(gen, monkeypatch, tmp_path):
    monkeypatch.setattr(classifier_module, "_f1", lambda logits, labels: 0.5)
    config = ClassifierConfig(n_models=2, iterations=30, batch_size=8, width=4, val_every=5,
                              patience=3, paste_size=(4, 6), paste_margin=0)
    full, full_report, _ = _classifier_run(gen, config, monkeypatch)
    assert full_report.iterations == [15, 15]
    with pytest.raises(KeyboardInterrupt):
        _classifier_run(gen, config, monkeypatch, stop_after=17,
                        stages=StageFiles(tmp_path, "classifier", {}, 0.0))
    resumed, report, drawn = _classifier_run(gen, config, monkeypatch,
                                             stages=StageFiles(tmp_path, "classifier", {}),
                                             resume=True)
    assert drawn == 13 and _same_weights(full, resumed)
    assert (report.iterations, report.best_f1) == (full_report.iterations, full_report.best_f1)


def test_classifier_config_validation():
    with pytest.raises(ValueError, match="n_models"):
        ClassifierConfig(n_models=0)
    with pytest.raises(ValueError, match="pool_cleaning_fraction"):
        ClassifierConfig(pool_cleaning_fraction=1.0)
    with pytest.raises(ValueError, match="threshold"):
        ClassifierConfig(threshold="median")

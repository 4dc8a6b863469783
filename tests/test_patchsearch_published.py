"""PatchSearch as published (``fastbd.patchsearch.published``): each behaviour of the official
code on a constructed case where it differs from fastbd's variant, the official rule's answer
worked out by hand; and the outputs read back the way the official scripts read them."""

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_poisoncam import _fake_scorer, small_config, world

from fastbd.cli import main
from fastbd.detection import ClassifierConfig, Config
from fastbd.detection.classifier import (
    PoisonNet,
    PoolSampler,
    ensemble_logits,
    paste_boxes,
    published_f1_percent,
    stops_early,
    validates_after,
)
from fastbd.detection.clustering import ClusteringModel, L2ClusteringModel
from fastbd.detection.flip import flip_counts, select_test_images, select_test_images_published
from fastbd.detection.search import SearchState, prune_lowest, prune_published, run_search
from fastbd.models import small_encoder
from fastbd.patchsearch import (
    PatchSearchMethod,
    PublishedPatchSearch,
    PublishedPatchSearchMethod,
    published_config,
)

PUBLISHED = PublishedPatchSearchMethod()
CORRECTED = PatchSearchMethod()


def test_flip_assignment_uses_raw_features_and_l2():
    """Centroids (0.5, 0) and (0.9, 0.3), a raw pasted feature (3, 0.3): by angle it is closest
    to the first (cos 0.995 vs 0.975), by L2 to the second (|f−c|² 6.34 vs 4.41)."""
    centroids = torch.tensor([[0.5, 0.0], [0.9, 0.3]])
    feature = torch.tensor([[3.0, 0.3]])
    official = L2ClusteringModel(centroids, torch.nn.functional.normalize(centroids, dim=1))
    labels, distances = official.assign(feature)
    assert labels.tolist() == [1] and distances.tolist() == pytest.approx([4.41])
    cosine = ClusteringModel(torch.nn.functional.normalize(centroids, dim=1))
    assert cosine.assign(feature)[0].tolist() == [0]


def test_l2_kmeans_leaves_the_centroids_unnormalised():
    """Two tight pairs of unit vectors: each centroid is its pair's mean, of norm < 1; the
    Grad-CAM logits are cosines to the normalised means."""
    angles = torch.tensor([0.0, 0.2, 1.5, 1.7])
    features = torch.stack([angles.cos(), angles.sin()], 1)
    model, labels, _ = L2ClusteringModel.fit(features, 2, 10, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    for members in ((0, 1), (2, 3)):
        mean = features[list(members)].mean(0)
        row = int(labels[members[0]])
        assert torch.allclose(model.centroids[row], mean, atol=1e-6)
        assert float(model.centroids[row].norm()) == pytest.approx(float(mean.norm()), abs=1e-6)
        assert float(mean.norm()) < 0.999
    logits = model.logits(features)
    assert torch.allclose(logits.max(1).values,
                          torch.tensor([0.1, 0.1, 0.1, 0.1]).cos(), atol=1e-5)


def test_test_set_takes_a_fixed_count_per_cluster_and_may_come_up_short():
    """Clusters of 5, 1 and 4 members, 7 test images: k = 7 // 3 = 2 closest of each — 2 + 1 +
    2 = 5 images; fastbd spreads all 7."""
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 2, 2])
    distances = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.6, 0.7, 0.5])
    g = torch.Generator().manual_seed(0)
    assert select_test_images_published(labels, distances, 7, g).tolist() == [1, 3, 5, 7, 9]
    assert select_test_images(labels, distances, 7, g).numel() == 7
    few = select_test_images_published(labels, distances, 2, g)  # k = 0: 2 random clusters
    assert few.numel() == 2 and set(few.tolist()) <= {1, 5, 9}


def test_paste_corners_never_reach_the_last_row_or_column(monkeypatch):
    import fastbd.detection.flip as flip

    corners = []

    def capture(images, patches, image_index, patch_index, ys, xs, **kwargs):
        corners.append(torch.stack([ys, xs], 1))
        return kwargs["out"]

    monkeypatch.setattr(flip, "paste", capture)
    bank = torch.zeros(50, 3, 12, 12, dtype=torch.uint8)
    trigger = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def encode_assign(x):
        return torch.zeros(x.shape[0], dtype=torch.long), torch.zeros(x.shape[0])

    for method in (PUBLISHED, CORRECTED):
        corners.clear()
        flip_counts(encode_assign, bank, torch.arange(50), torch.zeros(50, dtype=torch.long),
                    trigger, (0.5,) * 3, (0.5,) * 3, candidates_per_batch=1,
                    generator=torch.Generator().manual_seed(1),
                    corner_positions=method.flip_corner_positions(12, 4))
        assert int(torch.cat(corners).max()) == (7 if method is PUBLISHED else 8)


def test_a_cluster_scores_the_max_over_all_members_unscored_at_zero():
    """Cluster 0's members all flip negatively; one round scores two of its three. Official:
    the max over all three with the unscored one at 0 — 0. fastbd: the max of the two scored,
    below 0."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    values = torch.tensor([-3.0, -1.0, -2.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    for aggregate in ("max_all", "max"):
        state = SearchState.start(labels, 2, seed=0)
        state = run_search(state, _fake_scorer(values), samples_per_cluster=2,
                           prune_fraction=0.25, aggregate=aggregate, seed=0, verbose=False,
                           max_rounds=1)
        scored = state.members[0][state.scored[state.members[0]]]
        assert scored.numel() == 2
        expected = 0.0 if aggregate == "max_all" else float(values[scored].max())
        assert float(state.cluster_scores[0]) == expected and (aggregate == "max_all"
                                                               or expected < 0)


def test_pruning_as_published():
    """Remaining [0, 1, 2, 3, 4] scoring 5, 2, 5, 1, 2: numpy's argsort (insertion sort at this
    size) gives [3, 1, 4, 0, 2], reversed [2, 0, 4, 1, 3]; int(0.25·5) = 1 dropped → [2, 0, 4,
    1]. fastbd drops the lowest (3) and keeps the order. Three clusters: int(0.75) = 0 → none
    stay (the search ends); a round that scored nothing ends it too."""
    scores = torch.tensor([5.0, 2.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    assert prune_published([0, 1, 2, 3, 4], scores, 0.25, 10) == [2, 0, 4, 1]
    assert prune_lowest([0, 1, 2, 3, 4], scores, 0.25, 10) == [0, 1, 2, 4]
    assert prune_published([0, 1, 2], scores, 0.25, 6) == []
    assert prune_lowest([0, 1, 2], scores, 0.25, 6) == [0, 2]
    assert prune_published([0, 1, 2, 3, 4], scores, 0.25, 0) == []


def test_the_search_stops_below_four_clusters():
    """8 clusters of 20: published rounds 8 → 6 → 5 → 4 → 3 → stop (5 rounds, 2 × (8+6+5+4+3)
    = 52 images); fastbd 8 → 6 → 5 → 4 → 3 → 2 → 1 → 0 (7 rounds, 2 × 29 = 58)."""
    labels = torch.arange(160) % 8
    values = torch.arange(160, dtype=torch.float64)
    for method, rounds, scored in ((PUBLISHED, 5, 52), (CORRECTED, 7, 58)):
        state = run_search(SearchState.start(labels, 8, seed=0), _fake_scorer(values),
                           samples_per_cluster=2, prune_fraction=0.25,
                           aggregate=method.cluster_score, seed=0, verbose=False,
                           prune=method.prune)
        assert len(state.rounds) == rounds and int(state.scored.sum()) == scored


def test_rankings_as_published():
    """Scores [1, 3, 3, 0]: argsort ascending [3, 0, 1, 2], reversed [2, 1, 0, 3] — the tie
    order flips; the classifier's argsort(−scores) is [1, 2, 0, 3]; fastbd: [1, 2, 0, 3]."""
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0], dtype=torch.float64)
    assert PUBLISHED.rank(scores).tolist() == [2, 1, 0, 3]
    assert CORRECTED.rank(scores).tolist() == [1, 2, 0, 3]
    config = Config(topk_poisons=1, drop_top_fraction=0.5)
    positives, negatives, pool = PUBLISHED.classifier_sets(scores, PUBLISHED.rank(scores), 1,
                                                          config)
    assert positives.tolist() == [1] and negatives.tolist() == [3] and pool.tolist() == [0]


def test_the_published_classifier_recipe():
    published = ClassifierConfig(recipe="published", paste_margin=2, paste_size=(4, 8),
                                 val_every=20, patience=10, batch_size=4)
    fastbd = ClassifierConfig(paste_margin=2, paste_size=(4, 8), val_every=20, patience=10,
                              batch_size=4)
    # torchvision's stem at any size: 7×7 stride 2 + max-pool, also at 32 px
    stem = PoisonNet(4, 32, imagenet_stem=True).body
    assert stem[0].kernel_size == (7, 7) and stem[0].stride == (2, 2)
    assert isinstance(stem[3], torch.nn.MaxPool2d)
    assert PoisonNet(4, 32).body[0].kernel_size == (3, 3)
    # half-open ranges: side in [4, 8), corner in [2, 20 − side − 2)
    g = torch.Generator().manual_seed(0)
    for config, top_side in ((published, 7), (fastbd, 8)):
        sides, ys, xs = paste_boxes(4000, 20, config, g)
        assert int(sides.max()) == top_side and int(sides.min()) == 4
        reach = 20 - sides - 2 - (1 if config is published else 0)
        assert bool((ys <= reach).all()) and bool((ys == reach).any())
    # the pool read in shuffled passes: 10 rows, batches of 4 → every row once per pass
    sampler = PoolSampler(torch.arange(10, 20), published, torch.Generator().manual_seed(1))
    first = torch.cat([sampler.rows() for _ in range(2)] + [sampler.rows()[:2]])
    assert sorted(first.tolist()) == list(range(10, 20)) and sampler.epochs == 2
    # validation after the first update, then every 20; the stop needs more than 10 checks
    assert [s for s in range(1, 62) if validates_after(s, published)] == [1, 21, 41, 61]
    assert [s for s in range(1, 62) if validates_after(s, fastbd)] == [20, 40, 60]
    assert not stops_early([90] * 10, published) and stops_early([90] * 11, published)
    assert stops_early([90] * 10, fastbd)
    assert published_f1_percent(0.999) == 99 and round(100 * 0.999) == 100
    # members weighted by the passes they started: logits 1 and 4 with weights 3 and 1 → 1.75
    models = [torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Identity()) for _ in range(2)]

    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return torch.full((x.shape[0], 2), self.value)

    models = [Constant(1.0), Constant(4.0)]
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    logits = ensemble_logits(models, images, (0.5,) * 3, (0.5,) * 3, weights=[3, 1])
    assert torch.allclose(logits, torch.full((3, 2), 1.75))


def test_published_config_sets_the_official_classifier():
    config = published_config(Config(classifier=ClassifierConfig(width=8)))
    assert config.classifier.recipe == "published" and config.classifier.width == 8
    assert config.classifier.pool_cleaning_rounds == 0 and config.classifier.threshold == "argmax"


@pytest.mark.slow
def test_published_patchsearch_end_to_end(gen):
    images, truth, _ = world(gen, n=120, poisoned=12)
    config = small_config(n_clusters=8, test_set_size=24, topk_poisons=4, exported_patches=10,
                          classifier=ClassifierConfig(n_models=2, iterations=30, batch_size=16,
                                                      width=4, paste_size=(56, 84),
                                                      paste_margin=0, val_every=5))
    result = PublishedPatchSearch(config).fit(small_encoder(4, 16, seed=2), images,
                                              ground_truth=truth, verbose=False).result_
    assert result.method == "patchsearch-published"
    assert len(result.rounds) < 8 and result.rounds[-1]["remaining"] == 0
    assert result.config["classifier"]["recipe"] == "published"
    assert result.classifier["threshold"] == 0.0 and len(result.classifier["ensemble_weights"]) == 2
    assert result.top_patches.shape[0] == 10 and result.test_index.numel() <= 24
    assert result.metrics is not None


@pytest.mark.slow
def test_outputs_read_back_as_the_official_scripts_read_them(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "60", "--n-eval", "4",
                 "--absolute-paths", "--out", str(src)]) == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_clusters": 4, "n_masks": 4, "test_set_size": 12,
                                  "topk_poisons": 5, "exported_patches": 20, "classifier": {
                                      "n_models": 1, "iterations": 10, "width": 4,
                                      "val_every": 5, "patience": 2}}))
    out = tmp_path / "out"
    assert main(["--quiet", "patchsearch-published", "--file-list", str(src / "train.txt"),
                 "--arch", "smallconv4", "--config", str(config), "--absolute-paths",
                 "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    # patch_search_poison_classifier.py: np.load(--poison_scores), (-scores).argsort()
    scores = np.load(out / "scores.npy")
    assert scores.dtype == np.float64 and scores.shape == (60,)
    assert (-scores).argsort().shape == (60,)
    # its FileListDataset: sorted(glob(poison_dir/*.png))[:topk], PIL .convert('RGB')
    patches = sorted(glob.glob(f"{out / 'all_top_poison_patches'}/*.png"))
    assert [Path(p).name for p in patches[:3]] == ["00000.png", "00001.png", "00002.png"]
    assert [Path(p).name for p in patches] == [f"{i:05d}.png" for i in range(len(patches))]
    assert 5 <= len(patches) <= 20  # the exported count, or every scored image if fewer
    window = json.loads((out / "result.json").read_text())["config"]["window"]
    assert Image.open(patches[0]).convert("RGB").size == (window, window)
    # its file lists: line.strip().split() → (path, int(label)), opened from anywhere
    for line in (out / "filtered.txt").read_text().splitlines():
        path, label = line.strip().split()
        assert Path(path).is_absolute() and Path(path).is_file() and int(label) >= 0
    for line in (src / "train.txt").read_text().splitlines():
        assert Path(line.rsplit(" ", 1)[0]).is_absolute()
    test_index = np.load(out / "test_images.npy")
    labels = np.load(out / "cluster_labels.npy")
    assert test_index.dtype == np.int64 and labels.dtype == np.int64 and labels.shape == (60,)
    assert 0 < test_index.size <= 12 and test_index.max() < 60
    assert np.load(out / "margins.npy").shape == (60,)

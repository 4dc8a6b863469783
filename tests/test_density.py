"""The density detector: every score against a brute-force reference on the full distance
matrix, the neighbour search's edge cases, average precision against scikit-learn, quality on
a poisoned world CLIP, and the CLI's files."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastbd.density import (
    SCORES,
    DensityConfig,
    Neighbours,
    density_detect,
    density_scores,
    nearest_neighbours,
    robust_cutoff,
)
from fastbd.density.scores import MIN_DISTANCE
from fastbd.eval.metrics import average_precision


def brute_force(points: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The four scores by their definitions, from the whole float64 distance matrix."""
    unit = F.normalize(points.double(), dim=1)
    distance = torch.cdist(unit, unit)
    distance.fill_diagonal_(math.inf)
    d, idx = distance.sort(dim=1, stable=True)
    d, idx = d[:, :k].clamp_min(MIN_DISTANCE), idx[:, :k]
    n = points.shape[0]
    kd = d[:, -1]
    lid = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        mean_log = sum(math.log(d[i, j] / kd[i]) for j in range(k)) / k
        lid[i] = -1 / mean_log if mean_log < 0 else math.inf
    finite_max = lid[torch.isfinite(lid)].max() if torch.isfinite(lid).any() else 1.0
    slof = torch.tensor([float(sum(kd[i] / kd[o] for o in idx[i])) / k for i in range(n)],
                        dtype=torch.float64)
    dao = torch.tensor([math.log(sum(float(kd[i] / kd[o]) ** float(
        lid[o] if math.isfinite(lid[o]) else finite_max) for o in idx[i]) / k)
        for i in range(n)], dtype=torch.float64)
    return {"k_distance": kd, "lid": lid, "slof": slof, "dao": dao, "indices": idx}


@pytest.mark.parametrize("n, d, k, chunk", [(40, 5, 3, 4096), (97, 9, 8, 16), (33, 3, 1, 7)])
def test_scores_match_the_brute_force_definitions(n, d, k, chunk):
    g = torch.Generator().manual_seed(n)
    points = torch.randn(n, d, generator=g)
    expected = brute_force(points, k)
    neighbours = nearest_neighbours(points, k, chunk=chunk)
    assert torch.equal(neighbours.indices, expected["indices"])
    for score in SCORES:
        torch.testing.assert_close(density_scores(neighbours, score), expected[score],
                                   rtol=2e-4, atol=1e-5)


def test_duplicates_stay_finite_and_the_row_itself_is_never_its_neighbour():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 6, generator=g)
    points = torch.cat([base, base[:5], base[:5]])  # rows 0–4 three times each
    neighbours = nearest_neighbours(points, 4)
    rows = torch.arange(points.shape[0])[:, None]
    assert not (neighbours.indices == rows).any()
    assert (neighbours.distances >= MIN_DISTANCE).all()
    for score in SCORES:
        values = density_scores(neighbours, score)
        assert not torch.isnan(values).any()
        assert torch.isfinite(values).all() or score == "lid"
    assert set(neighbours.indices[0, :2].tolist()) == {30, 35}  # its two copies first


def test_neighbour_search_refuses_impossible_k_and_scores_an_empty_table():
    for empty in (torch.empty(0, 3), torch.randn(1, 3)):
        with pytest.raises(ValueError, match="at least 2 points"):
            nearest_neighbours(empty, 1)
    table = Neighbours(torch.empty(0, 4, dtype=torch.float64), torch.empty(0, 4, dtype=torch.long))
    for score in SCORES:
        assert density_scores(table, score).shape == (0,)
    points = torch.randn(5, 3)
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must be in"):
            nearest_neighbours(points, k)
    with pytest.raises(ValueError, match="score must be one of"):
        density_scores(nearest_neighbours(points, 2), "lof")


def test_average_precision_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    for n, tied in ((50, False), (400, True), (7, True)):
        scores = (torch.randint(0, 5, (n,), generator=g).double() if tied
                  else torch.randn(n, generator=g))
        truth = torch.rand(n, generator=g) < 0.3
        truth[0] = True
        assert average_precision(scores, truth) == pytest.approx(
            average_precision_score(truth.numpy(), scores.numpy()), abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        average_precision(torch.randn(4), torch.zeros(4, dtype=torch.bool))


def test_robust_cutoff_follows_the_score_distribution():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, math.inf])
    # The finite scores [1, 2, 3, 4, 100]: median 3, median absolute deviation 1.
    assert robust_cutoff(scores, 3.0) == pytest.approx(3 + 3 * 1.4826)


@pytest.fixture(scope="module")
def poisoned_clip():
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat
    from fastbd.world.synthetic import WorldConfig

    config = CLIPThreatConfig(world=replace(WorldConfig(), n_train=2000, n_eval=200),
                              attack="badnet", rate=0.02, train=CLIPTrainConfig(epochs=6))
    return build_clip_threat(config, cache_dir=None, verbose=False)


def test_density_finds_the_poisoned_pairs_of_a_backdoored_clip(poisoned_clip):
    from fastbd.models.clip import tokenize

    threat = poisoned_clip
    assert threat.evaluation.asr > 0.5  # the backdoor is there to find
    tokens = tokenize(threat.tokenizer, threat.poisoned.captions, 32)
    truth = threat.poisoned.poison_mask
    quality = {}
    for score in SCORES:
        result = density_detect(threat.model, threat.poisoned.images, tokens,
                                config=DensityConfig(score=score))
        quality[score] = result.metrics(truth)
    # Measured here (2,000 pairs, 2 % poisoned): AUROC k-distance 0.91, DAO 0.79 (AUPRC 0.27,
    # recall of the flagged set 45 %), SLOF 0.64, LID 0.29.
    assert quality["k_distance"]["auroc"] > 0.85
    assert quality["dao"]["auroc"] > 0.7
    assert quality["dao"]["recall"] > 0.3
    assert quality["dao"]["auprc"] > 5 * float(truth.double().mean())  # well above chance


def test_cli_density_writes_scores_and_the_filtered_csv(tmp_path):
    from fastbd.cli import main
    from fastbd.data.readers import read_csv_pairs
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    data = tmp_path / "data"
    assert main(["--quiet", "attack", "--attack", "badnet", "--n-train", "120", "--n-eval",
                 "20", "--rate", "0.05", "--out", str(data)]) == 0
    torch.save(tiny_clip(TinyCLIPConfig(), seed=2).state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "density"
    assert main(["--quiet", "density", "--csv", str(data / "train.csv"), "--checkpoint",
                 str(tmp_path / "clip.pt"), "--reference-checkpoint", str(tmp_path / "clip.pt"),
                 "--k", "8", "--score", "slof", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    flagged = int(result["flagged"])
    assert result["config"]["score"] == "slof" and result["config"]["k"] == 8
    assert set(result["metrics"]) >= {"auroc", "auprc", "precision", "recall"}
    assert result["ubt_split"]["tp"] + result["ubt_split"]["fp"] == 1  # 1 % of 120, at least 1
    kept = read_csv_pairs(out / "filtered.csv")
    assert len(kept.paths) == 120 - flagged and all(p.is_file() for p in kept.paths)
    with open(out / "filtered.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["image", "caption", "label", "is_backdoor"]
    assert not (out / "pairs.npy").exists()
    import numpy as np

    assert np.load(out / "scores.npy").shape == (120,)
    assert int(np.load(out / "flagged.npy").sum()) == flagged


def test_cli_density_saves_its_result_when_the_truth_holds_one_class(tmp_path):
    """A clean CSV (every is_backdoor 0): the metrics that need both classes are null with a
    note, the rest of the result is saved, exit 0."""
    from fastbd.cli import main
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    data = tmp_path / "data"
    assert main(["--quiet", "attack", "--attack", "badnet", "--n-train", "60", "--n-eval",
                 "10", "--rate", "0.05", "--out", str(data)]) == 0
    with open(data / "train.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["is_backdoor"] == "0"]
    with open(data / "clean.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    torch.save(tiny_clip(TinyCLIPConfig(), seed=2).state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "density"
    assert main(["--quiet", "density", "--csv", str(data / "clean.csv"), "--checkpoint",
                 str(tmp_path / "clip.pt"), "--reference-checkpoint", str(tmp_path / "clip.pt"),
                 "--k", "8", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    for metrics in (result["metrics"], result["ubt_split"]):
        assert metrics["auroc"] is None and metrics["auprc"] is None
        assert "one class" in metrics["note"]
    assert result["pairs"] == len(rows)

import pytest
import torch
from sklearn import metrics as skm

from fastbd.eval import (
    accuracy,
    attack_success_rate,
    auroc,
    box_iou,
    catch_rate,
    detection_metrics,
    trigger_coverage,
    window_accuracy,
)


@pytest.mark.parametrize("n", [7, 100, 1000])
def test_detection_metrics_match_sklearn(gen, n):
    truth = torch.rand(n, generator=gen) < 0.3
    truth[0], truth[1] = True, False
    predicted = torch.rand(n, generator=gen) < 0.4
    scores = torch.randint(0, 20, (n,), generator=gen).float()  # many ties
    m = detection_metrics(predicted, truth, scores)
    assert m.precision == pytest.approx(skm.precision_score(truth, predicted, zero_division=0))
    assert m.recall == pytest.approx(skm.recall_score(truth, predicted))
    assert m.f1 == pytest.approx(skm.f1_score(truth, predicted, zero_division=0))
    tn, fp, fn, tp = skm.confusion_matrix(truth, predicted, labels=[0, 1]).ravel()
    assert (m.tp, m.fp, m.tn, m.fn) == (tp, fp, tn, fn)
    assert m.auroc == pytest.approx(skm.roc_auc_score(truth, scores))
    assert m.auprc == pytest.approx(skm.average_precision_score(truth, scores))
    without = detection_metrics(predicted, truth)
    assert without.auroc is None and without.auprc is None


def test_auroc_continuous_scores(gen):
    truth = torch.rand(500, generator=gen) < 0.5
    scores = torch.randn(500, generator=gen) + truth.float()
    assert auroc(scores, truth) == pytest.approx(skm.roc_auc_score(truth, scores))
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc(scores, torch.ones(500, dtype=torch.bool))


def test_accuracy_and_asr_match_definition(gen):
    labels = torch.randint(0, 5, (300,), generator=gen)
    predicted = torch.randint(0, 5, (300,), generator=gen)
    assert accuracy(predicted, labels) == pytest.approx(skm.accuracy_score(labels, predicted))
    non_target = labels != 2
    expected = float((predicted[non_target] == 2).float().mean())
    assert attack_success_rate(predicted, labels, 2) == pytest.approx(expected)
    # Target-class images never count, even when predicted as the target.
    assert attack_success_rate(torch.tensor([2, 2, 0]), torch.tensor([2, 1, 1]), 2) == 0.5


def test_boxes():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 2, 2]])
    b = torch.tensor([[0, 0, 10, 10], [5, 5, 10, 10], [20, 20, 3, 3]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1.0, 25 / 175, 0.0],
                                                          dtype=torch.float64))
    assert window_accuracy(a, b) == pytest.approx(2 / 3)  # any part of the trigger inside
    assert window_accuracy(a, b, threshold=0.5) == pytest.approx(1 / 3)
    # CR: the share of the true box inside the window — 100, 25 of 100, 0 of 9 pixels
    torch.testing.assert_close(trigger_coverage(a, b), torch.tensor(
        [1.0, 0.25, 0.0], dtype=torch.float64))
    assert catch_rate(a, b) == pytest.approx((1 + 0.25 + 0) / 3)
    # a window wholly around a small trigger catches all of it at a low IoU
    big, small = torch.tensor([[0, 0, 10, 10]]), torch.tensor([[2, 2, 4, 4]])
    assert catch_rate(big, small) == 1.0 and float(box_iou(big, small)) == pytest.approx(0.16)
    # a clean image (empty true box) catches nothing
    assert float(trigger_coverage(big, torch.tensor([[0, 0, 0, 0]]))) == 0.0


@pytest.mark.parametrize("call,match", [
    (lambda: detection_metrics(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)),
     "entries"),
    (lambda: detection_metrics(torch.tensor([0.5, 1.0]), torch.tensor([0, 1])), "boolean"),
    (lambda: accuracy(torch.tensor([]), torch.tensor([])), "empty"),
    (lambda: attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1]), 1), "outside"),
    (lambda: box_iou(torch.zeros(2, 3), torch.zeros(2, 3)), "N×4"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_linear_probe_fit_matches_sklearn_and_ignores_the_global_rng(gen):
    from sklearn.linear_model import LogisticRegression

    from fastbd.models.linear import fit_linear

    n, dim, classes, weight_decay = 300, 6, 4, 1e-3
    labels = torch.randint(0, classes, (n,), generator=gen)
    centres = 1.5 * torch.randn(classes, dim, generator=gen)
    features = centres[labels] + torch.randn(n, dim, generator=gen)
    torch.manual_seed(1)
    layer = fit_linear(features, labels, classes, steps=200, weight_decay=weight_decay)
    torch.manual_seed(2)
    again = fit_linear(features, labels, classes, steps=200, weight_decay=weight_decay)
    assert torch.equal(layer.weight, again.weight) and torch.equal(layer.bias, again.bias)
    # Same objective: mean cross-entropy + wd·‖W‖² ⇔ sklearn's C = 1 / (2·N·wd).
    reference = LogisticRegression(C=1 / (2 * n * weight_decay), tol=1e-10, max_iter=10_000)
    reference.fit(features.double().numpy(), labels.numpy())
    with torch.no_grad():
        ours = layer(features).softmax(1).double().numpy()
    assert abs(ours - reference.predict_proba(features.double().numpy())).max() < 2e-3


def test_per_target_detection_by_hand():
    from fastbd.eval.metrics import per_target_detection

    #                images: 0   1   2  3  4  5  6
    poison_target = torch.tensor([3, 3, 3, 7, 7, -1, -1])
    removed = torch.tensor([True, True, False, True, False, True, False])
    out = per_target_detection(removed, torch.tensor([0, 3, 1, 5]), poison_target)
    assert out == {3: {"poisoned": 3, "recall": 2 / 3, "topk_share": 0.5},
                   7: {"poisoned": 2, "recall": 0.5, "topk_share": 0.25}}
    assert per_target_detection(removed, torch.tensor([], dtype=torch.long),
                                torch.full((7,), -1)) == {}
    with pytest.raises(ValueError, match="entries"):
        per_target_detection(removed[:3], torch.tensor([0]), poison_target)


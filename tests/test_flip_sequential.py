"""The sequential flip test (``Config.flip_test="sequential"``): its stopping computed by hand,
its exactness against the exhaustive flip test, and its error bound by simulation."""

import math

import pytest
import torch

from fastbd.detection.flip import (
    FIRST_LOOK,
    crop_windows,
    flip_bounds,
    flip_counts,
    look_sizes,
    sequential_flip_counts,
)

from testutil import MAGENTA, MEAN, STD


def magenta_assign(x):
    """Cluster 1 when a 4×4 magenta patch is in the (normalised) image, else 0."""
    pixels = x * 0.25 + 0.5
    magenta = (pixels[:, 0] > 0.9) & (pixels[:, 1] < 0.1) & (pixels[:, 2] > 0.9)
    present = (magenta.sum((1, 2)) >= 16).long()
    return present, torch.zeros(x.shape[0])


def grey_images(n, size=16):
    return torch.full((n, 3, size, size), 100, dtype=torch.uint8)


def test_look_sizes():
    assert look_sizes(150) == [16, 32, 64, 128, 150]
    assert look_sizes(64) == [16, 32, 64] and look_sizes(10) == [10]
    assert look_sizes(FIRST_LOOK) == [FIRST_LOOK]


def test_a_candidate_stops_where_the_bounds_say():
    images = grey_images(64)
    test_index, test_labels = torch.arange(64), torch.zeros(64, dtype=torch.long)
    triggers = torch.cat([MAGENTA[None, :, None, None].expand(2, 3, 4, 4),
                          torch.full((3, 3, 4, 4), 30, dtype=torch.uint8)])
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    common = dict(candidates_per_batch=2, order=order, threshold=-math.inf, error=0.01)
    scores, tested = sequential_flip_counts(magenta_assign, images, test_index, test_labels,
                                            triggers, MEAN, STD, keep=2,
                                            generator=torch.Generator().manual_seed(1), **common)
    # By hand, after the first 16 test images (looks 16, 32, 64): the triggers flipped all 16,
    # the grey patches none. Chernoff's KL bound at error 0.01 over 3 looks, budget
    # log(3 / 0.01) / 16: KL(1 ‖ q) = −log q and KL(0 ‖ q) = −log(1 − q), so the edges are
    # q = exp(−budget) and q = 1 − exp(−budget)
    budget = math.log(3 / 0.01) / 16
    trigger_low = max(64 * math.exp(-budget), 16)  # 44.76
    grey_high = min(64 * (1 - math.exp(-budget)), 0 + 48)  # 19.24
    lower, upper = flip_bounds(torch.tensor([16.0, 0.0], dtype=torch.float64), 16, 64, 0.01, 3)
    assert float(lower[0]) == pytest.approx(trigger_low, abs=1e-6)
    assert float(upper[1]) == pytest.approx(grey_high, abs=1e-6)
    # the 2nd best lower bound (a trigger's, 44.76) is above every grey patch's upper bound
    assert tested.tolist() == [64, 64, 16, 16, 16]
    assert scores.tolist() == [64.0, 64.0, 0.0, 0.0, 0.0]
    # keep=3: the 3rd best lower bound is a grey patch's (0), so nothing can stop
    _, tested = sequential_flip_counts(magenta_assign, images, test_index, test_labels,
                                       triggers, MEAN, STD, keep=3,
                                       generator=torch.Generator().manual_seed(1), **common)
    assert tested.tolist() == [64] * 5
    # a bar from the search (the k-th best exact score so far) stops them without any trigger
    _, tested = sequential_flip_counts(magenta_assign, images, test_index, test_labels,
                                       triggers[2:], MEAN, STD, keep=5, generator=torch.Generator(),
                                       **{**common, "threshold": 30.0})
    assert tested.tolist() == [16, 16, 16]


def test_source_cluster_scores_bound_only_what_the_paste_decides():
    """With source clusters the score is (pasted test images in the candidate's cluster) −
    (those already there); the second part is known for every test image, so the bounds are
    the 0/1 part's, shifted by it exactly."""
    images = grey_images(64)
    test_index = torch.arange(64)
    test_labels = (torch.arange(64) % 4 == 0).long()  # 16 test images already in cluster 1
    triggers = torch.cat([MAGENTA[None, :, None, None].expand(2, 3, 4, 4),
                          torch.full((3, 3, 4, 4), 30, dtype=torch.uint8)])
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    scores, tested = sequential_flip_counts(
        magenta_assign, images, test_index, test_labels, triggers, MEAN, STD,
        candidates_per_batch=2, order=order, threshold=10.0, keep=5, error=0.01,
        source_clusters=torch.ones(5, dtype=torch.long),
        generator=torch.Generator().manual_seed(1))
    # by hand at the first look: a grey patch put none of 16 in cluster 1, its upper bound
    # 64 · (1 − exp(−log(3 / 0.01) / 16)) − 16 = 3.24 is below the bar (10): stopped
    grey_high = 64 * (1 - math.exp(-math.log(3 / 0.01) / 16)) - 16
    assert grey_high < 10.0
    assert tested.tolist() == [64, 64, 16, 16, 16]
    assert scores[:2].tolist() == [48.0, 48.0]


def _random_world(gen, n=60, size=16):
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    weights = torch.randn(3 * size * size, 5, generator=gen)

    def assign(x):  # a fixed random projection's argmax: content-dependent clusters
        return (x.flatten(1).float() @ weights).argmax(1), torch.zeros(x.shape[0])

    return images, assign


@pytest.mark.parametrize("scoring", ["flips", "source-cluster"])
def test_a_candidate_tested_to_the_end_has_its_exhaustive_score(gen, scoring):
    images, assign = _random_world(gen)
    test_index = torch.arange(40, 60)
    test_labels = assign((images[test_index].float() / 255 - 0.5) / 0.25)[0]
    windows = torch.randint(0, 11, (9, 2), generator=gen)
    triggers = crop_windows(images, torch.arange(9), windows, 6)
    triggers[:3] = MAGENTA[None, :, None, None]
    source = torch.randint(0, 5, (9,), generator=gen) if scoring == "source-cluster" else None
    seed = int(torch.randint(2**31, (1,), generator=gen))
    exhaustive = flip_counts(assign, images, test_index, test_labels, triggers, MEAN, STD,
                             candidates_per_batch=4, source_clusters=source,
                             generator=torch.Generator().manual_seed(seed))
    order = torch.randperm(20, generator=gen)
    for keep, threshold in ((100, -math.inf), (2, -math.inf), (3, 5.0)):
        scores, tested = sequential_flip_counts(
            assign, images, test_index, test_labels, triggers, MEAN, STD,
            candidates_per_batch=4, source_clusters=source, order=order, keep=keep,
            threshold=threshold, error=0.05, generator=torch.Generator().manual_seed(seed))
        full = tested == 20
        assert torch.equal(scores[full], exhaustive[full])
        if keep == 100 and threshold == -math.inf:  # no bar: everything tested to the end
            assert bool(full.all())
        stopped = ~full
        assert bool((tested[stopped] < 20).all())
        # a stopped candidate's estimate: its sum scaled to the whole test set
        assert bool((scores[stopped] * tested[stopped] / 20).remainder(1).abs().lt(1e-4).all())


def test_no_candidate_and_a_test_set_below_the_first_look(gen):
    images, assign = _random_world(gen, n=10)
    empty = torch.empty(0, 3, 4, 4, dtype=torch.uint8)
    args = (assign, images, torch.arange(5), torch.zeros(5, dtype=torch.long))
    common = dict(candidates_per_batch=3, order=torch.arange(5), threshold=-math.inf, keep=1,
                  error=0.1)
    scores, tested = sequential_flip_counts(*args, empty, MEAN, STD, generator=torch.Generator(),
                                            **common)
    assert scores.numel() == 0 and tested.numel() == 0
    triggers = crop_windows(images, torch.arange(3), torch.zeros(3, 2, dtype=torch.long), 4)
    scores, tested = sequential_flip_counts(*args, triggers, MEAN, STD,
                                            generator=torch.Generator().manual_seed(3), **common)
    assert tested.tolist() == [5, 5, 5]  # one look: the whole (small) test set
    assert torch.equal(scores, flip_counts(*args, triggers, MEAN, STD, candidates_per_batch=3,
                                           generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("ones", [0, 4, 40, 200, 360, 400])
def test_the_bounds_fail_at_most_at_the_stated_rate(ones):
    """Simulation: a candidate whose full score is ``ones`` of 400 test images, seen in random
    orders; at error 0.2 its upper bound falls below its score (or its lower bound rises above
    it) at some look in at most 20 % of the orders — here far fewer: the bound is
    conservative."""
    n_test, error, sims = 400, 0.2, 4000
    population = torch.zeros(n_test, dtype=torch.float64)
    population[:ones] = 1.0
    g = torch.Generator().manual_seed(ones)
    orders = torch.argsort(torch.rand(sims, n_test, generator=g), dim=1)
    running = population[orders].cumsum(1)
    looks = look_sizes(n_test)
    below = torch.zeros(sims, dtype=torch.bool)
    above = torch.zeros(sims, dtype=torch.bool)
    for look in looks:
        lower, upper = flip_bounds(running[:, look - 1], look, n_test, error, len(looks))
        below |= upper < ones
        above |= lower > ones
        if look == n_test:  # the last look is the exact score
            assert torch.allclose(lower, torch.full_like(lower, ones))
            assert torch.allclose(upper, torch.full_like(upper, ones))
    assert float(below.double().mean()) <= error and float(above.double().mean()) <= error

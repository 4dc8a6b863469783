"""The scale-out model's bookkeeping (``scaling_model.py``): no communication on one rank, no
stage faster than a perfect split, the search's busiest rank holding its share of every round's
blocks, and UBT's training steps bound by the gradient all-reduce beyond one node."""

import math

import pytest

from scaling_model import poisoncam, ubt


@pytest.mark.parametrize("model, size", [(poisoncam, 100_000), (ubt, 1_000_000)])
def test_no_stage_beats_a_perfect_split_and_one_rank_communicates_nothing(model, size):
    alone = model(size, 1)
    assert not any(alone["communication_s"].values())
    for ranks in (2, 8, 32):
        split = model(size, ranks)
        for stage, seconds in alone["stages_s"].items():
            assert split["stages_s"][stage] >= seconds / ranks * (1 - 1e-9), stage


def test_the_search_waits_for_its_busiest_rank():
    alone, split = poisoncam(1_281_167, 1), poisoncam(1_281_167, 32)
    assert alone["busiest_rank_blocks"] == alone["search_blocks"]
    assert split["busiest_rank_blocks"] >= math.ceil(split["search_blocks"] / 32)
    assert split["rounds"] == alone["rounds"] and split["scored"] == alone["scored"]


def test_ubt_training_steps_are_communication_bound_across_nodes():
    four_nodes = ubt(12_000_000, 32)
    for stage in ("overfit", "unlearn"):
        assert four_nodes["communication_s"][stage] > four_nodes["stages_s"][stage]

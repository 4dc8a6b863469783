"""``bench/poisoncam_tables.py``'s and ``bench/search_cost.py``'s cells and tables on constructed
rows (the runs themselves take minutes and run by hand)."""

from poisoncam_tables import DETECTORS, cells, key, tables
from search_cost import summary


def _row(seed, detector, setting, value, **extra):
    curve = [{"k": k, "acc": 1.0, "iou": 0.5, "cr": 0.9} for k in (5, 20, 50)]
    return {"key": key((seed, detector, setting, value)), "seed": seed, "detector": detector,
            "setting": setting, "value": value, "removed": 250, "recall": 1.0,
            "precision": 0.99, "f1": 0.995, "top20": 1.0, "iou": 0.5, "cr": 0.9, "acc": 1.0,
            "curve": curve, "cpu_s": 60.0, "candidate_s_per_image": 0.01, **extra}


def test_every_setting_is_one_cell_and_the_defaults_are_not_run_twice():
    grid = cells([0])
    assert len(grid) == len(set(grid))
    assert [c for c in grid if c[2] == "default"] == [(0, d, "default", None) for d in DETECTORS]
    assert (0, "poisoncam", "n_masks", 64) not in grid  # the demo's own value: the default
    assert (0, "poisoncam", "mask_strategy", "full") not in grid
    assert {c[3] for c in grid if c[2] == "window"} == {40, 50, 70, 80}


def test_tables_take_the_default_cell_for_the_demos_own_values():
    rows = [_row(0, d, "default", None) for d in DETECTORS]
    rows.append(_row(0, "poisoncam", "n_masks", 16, removed=300))
    text = tables(rows)
    assert "| 0 | poisoncam | 250 | 100.0 | 99.0 | 99.5 | 100.0 | 60 |" in text
    assert "| 0 | n_masks = 16 | 50.0 | 90.0 | 100.0 | 300 |" in text
    assert "| 0 | n_masks = 64 | 50.0 | 90.0 | 100.0 | 250 |" in text  # the default cell
    assert "| 0 | poisoncam | 100.0 / 50.0 / 90.0 | 100.0 / 50.0 / 90.0 |" in text
    assert "n_masks = 32" not in text  # not run: no row


def test_search_cost_summary_ratios():
    rows = [{"world": "implanted", "seed": 0, "modes": {
        "exhaustive": {"search_forwards": 1000, "search_s": 10.0},
        "sequential": {"search_forwards": 250, "search_s": 4.0}}}]
    assert summary(rows) == {"implanted_seed0_search_forwards_ratio": 4.0,
                             "implanted_seed0_search_seconds_ratio": 2.5}


def test_ubt_tables_average_over_seeds_and_quote_the_paper_beside():
    from ubt_tables import ABLATION_ATTACKS, ATTACKS, METHODS, TABLE_IX, TABLE_V, VARIANTS
    from ubt_tables import cells as ubt_cells
    from ubt_tables import key as ubt_key
    from ubt_tables import tables as ubt_tables

    grid = ubt_cells([0, 1])
    assert len(grid) == len(set(grid)) == 2 * (len(ATTACKS) * len(METHODS) + len(TABLE_V)
                                                + len(ABLATION_ATTACKS) * len(VARIANTS)
                                                + 2 * len(TABLE_IX))

    def row(seed, attack, method, ca, asr, **extra):
        return {"key": ubt_key((seed, attack, method)), "seed": seed, "attack": attack,
                "method": method, "ca": ca, "asr": asr, "retrieval_asr": asr / 2, "kl": 0.1,
                "training_s": 60.0, "defense_s": None if method in ("none", "roclip") else 30.0,
                **extra}

    rows = [row(0, "badnet", "none", 0.96, 0.92), row(1, "badnet", "none", 0.94, 0.90),
            row(0, "badnet", "ubt", 0.95, 0.0), row(0, "sig", "ubt", 0.95, 0.5, declined=True),
            row(0, "badnet", "abl-paper-textmask", 0.5, 0.9),
            row(0, "blended", "ubt-image", 0.9, 0.01), row(0, "none", "cleanclip", 0.93, 0.01),
            row(0, "none", "ubt", 0.97, 0.02, declined=True),
            row(0, "badnet@0.002", "none", 0.96, 0.7, poisoned_pairs=10),
            row(0, "badnet@0.002", "ubt", 0.955, 0.001)]
    text = ubt_tables(rows)
    assert "| badnet | abl-paper-textmask | 50.0 | 90.0 | 51.57 / 89.56 |" in text
    assert "| blended | ubt-image | 90.0 | 1.0 | 59.90 / 0.20 |" in text
    assert "| cleanclip | 93.0 | 1.0 | 0.100 | 59.38 |" in text
    assert "| ubt | 97.0 | 2.0 | 0.100 | 62.69 |" in text
    assert "| badnet | 95.0 → 95.0 | 91.0 → 0.0 | 62.61 / 80.92 → 61.51 / 0.00 |" in text
    assert "| badnet | none | 95.0 | 91.0 | 0.100 | 45.5 | 62.61 / 80.92 / 0.035 |" in text
    assert "| badnet | ubt | 95.0 | 0.0 | 0.100 | 0.0 | 61.51 / 0.00 / 0.074 |" in text
    assert "| none | 60 | – | 60 | 2826 / – |" in text
    assert "| ubt | 60 | 30 | 90 | 2826 / 7402 |" in text
    assert "declined (model returned unchanged): 0/sig/ubt" in text
    assert ("| 1000 | 0.20 % | 10 | 96.0 → 95.5 | 70.0 → 0.1 | 62.79 / 72.45 → 61.81 / 0.02 |"
            in text)
    assert "| blended | ubt |" not in text and "| sig | none |" not in text  # not run: no row


def test_multi_target_cells_and_their_table():
    from poisoncam_tables import MULTI_TARGETS, threat_targets

    grid = cells([0])
    multi = [c for c in grid if c[2] == "targets"]
    assert sorted(multi) == sorted((0, d, "targets", k) for d in DETECTORS for k in MULTI_TARGETS)
    assert threat_targets((0, "poisoncam", "targets", 3)) == MULTI_TARGETS[3][1:]
    assert threat_targets((0, "poisoncam", "default", None)) == ()
    per = {"0": {"poisoned": 250, "recall": 1.0, "topk_share": 0.55},
           "4": {"poisoned": 250, "recall": 0.98, "topk_share": 0.45}}
    text = tables([_row(0, "poisoncam", "targets", 2, removed=500, per_target=per)])
    assert ("| 0 | 0, 4 | poisoncam | 500 | 100.0 | 99.0 | 99.5 | 0: 100.0 / 55.0; "
            "4: 98.0 / 45.0 | 100.0 / 50.0 / 90.0 |") in text


def test_rate_sweep_tables_name_each_look_and_judge_it_apart():
    from rate_sweep import tables as sweep_tables

    def cell(look, asr_after, ca_after=0.96):
        return {"look": look, "seed": 0, "attack": "badnet", "rate": 0.01, "poisoned_pairs": 50,
                "ca_before": 0.965, "asr_before": 0.9, "defenses": {
                    "ubt": {"ca_after": ca_after, "asr_after": asr_after, "cpu_s": 1.0,
                            "suspicious": 100, "suspicious_poisoned": 50, "poisoned": True,
                            "check_statistic": 0.9, "topk": 60, "topk_poisoned": 50},
                    "cleanclip": {"ca_after": 0.95, "asr_after": 0.5, "cpu_s": 1.0}}}

    old = {k: v for k, v in cell("default", 0.0).items() if k != "look"}  # rows before looks
    clean = {"look": "noisy", "seed": 0, "training_seed": 0, "ca": 0.9, "check_statistic": 0.1,
             "declined": True, "unchanged": True, "suspicious": 0}
    wrong = {**clean, "training_seed": 100, "check_statistic": 0.6, "declined": False,
             "unchanged": False, "ca_after": 0.87}
    text = sweep_tables({"cells": [cell("noisy", 0.2, 0.93), old], "clean": [clean, wrong]})
    rows = text.splitlines()
    first_default = next(i for i, r in enumerate(rows) if r.startswith("| 0 | badnet"))
    first_noisy = next(i for i, r in enumerate(rows) if r.startswith("| noisy 0 | badnet"))
    assert first_default < first_noisy  # the default look first
    assert "| noisy 0, 0 | 90.0 | 0 | 0.10 | yes | 90.0 |" in text
    assert "| noisy 0, 100 | 90.0 | 0 | 0.60 | NO | 87.0 |" in text  # what the wrong verdict cost
    assert "targets missed: 2 — badnet 1 % world noisy 0: ASR after 20.0 %; " \
           "badnet 1 % world noisy 0: CA −3.5." in text
    assert "On the noisy look alone: Cells with ASR before ≥ 20 %: 1 of 1; targets missed: 2" \
        in text


def test_ubt_tables_redo_drops_only_the_asked_seeds_and_attacks_rows():
    from ubt_tables import cells as ubt_cells
    from ubt_tables import key as ubt_key
    from ubt_tables import plan

    rows = [{"key": ubt_key(c), "method": c[2]} for c in ubt_cells([0, 1])]
    kept, todo = plan(rows, [0], {"trojvqa"}, {"ubt", "none"})
    assert sorted(todo) == [(0, "trojvqa", "none"), (0, "trojvqa", "ubt")]
    assert len(kept) == len(rows) - 2
    assert {"0/badnet/ubt", "1/trojvqa/ubt", "0/trojvqa/cleanclip"} <= {r["key"] for r in kept}
    kept, todo = plan(rows[:3], [0], set(), set())  # nothing redone: what is missing runs
    assert kept == rows[:3] and len(todo) == len(ubt_cells([0])) - 3


def test_looks_flag_refuses_an_unknown_look_and_rows_name_their_world():
    import argparse

    import pytest
    from results_doc import add_looks_flag, look_of, world_label

    parser = argparse.ArgumentParser()
    add_looks_flag(parser)
    assert parser.parse_args([]).looks == ["default"]
    assert parser.parse_args(["--looks", "noisy,faint"]).looks == ["noisy", "faint"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--looks", "noisy,foggy"])
    assert look_of({"seed": 2}) == "default" and world_label({"seed": 2}) == "2"
    assert world_label({"seed": 2, "look": "faint"}) == "faint 2"

"""``bench/quality.py``'s target checks on constructed rows (the runs themselves take minutes
and run by hand)."""

from quality import poisoncam_misses, ubt_verdicts, world_row_checks


def test_poisoncam_misses_names_each_target_below_its_bound():
    row = {"seed": 1, "method": "poisoncam", "recall": 0.96, "precision": 0.5,
           "trigger_overlap": 0.85}
    assert poisoncam_misses(row) == ["seed1/precision=0.500", "seed1/trigger_overlap=0.850"]
    assert poisoncam_misses({**row, "method": "patchsearch"}) == []


def test_ubt_verdicts():
    rows = [{"method": "ubt", "attack": "none", "poisoned": False, "ca_before": 0.9,
             "ca_after": 0.9},
            {"method": "ubt", "attack": "badnet", "asr_before": 0.95, "asr_after": 0.01,
             "ca_before": 0.9, "ca_after": 0.87, "topk_poisoned": 9, "topk": 9},
            {"method": "ubt", "attack": "sig", "asr_before": 0.2, "asr_after": 0.2,
             "ca_before": 0.9, "ca_after": 0.9},
            {"method": "cleanclip", "attack": "sig"}]
    assert [v["verdict"] for v in ubt_verdicts(rows)] == ["ok", "MISSED", "ok", "no backdoor"]


def test_world_row_checks():
    ssl = {"model": "ssl", "attack": "htba", "ca": 0.7, "asr": 0.1, "train_s": 100}
    assert world_row_checks(ssl) == {"ca": True, "asr": False, "time": True}
    clean = {"model": "clip", "attack": "none", "ca": 0.9, "asr": 0.02, "train_s": 400}
    assert world_row_checks(clean) == {"ca": True, "asr": True, "time": False}

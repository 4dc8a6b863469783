"""The performance model's arithmetic: counted bytes and FLOPs, floors, the measured column."""

import pytest

from roofline import MACHINES, entries, measured_s, section, table


def test_counted_bytes_and_floors():
    rows = {e.name: e for e in entries()}
    mask_fill = rows["mask_fill"]
    assert mask_fill.bytes == 8 * 256 * 3 * 224 * 224 * 2 + 8 * 3 * 224 * 224
    assert mask_fill.bound("H100") == "memory"
    assert mask_fill.floor_s("H100") == pytest.approx(mask_fill.bytes / 3.0e12)
    kmeans = rows["kmeans_assign"]
    assert kmeans.flop == 2.0 * 127_000 * 1000 * 768 and kmeans.bound("H100") == "compute"
    assert kmeans.floor_s("H200") == pytest.approx(kmeans.flop / MACHINES["H200"]["flop_per_s"])
    for e in entries():
        assert e.floor_s("H200") <= e.floor_s("H100") * 1.02  # the H200 is no slower
        assert e.overhead >= 1.0 and e.why


def test_the_measured_column_comes_from_a_gpu_run():
    benchmarks = {"benchmarks": [{"name": "test_mask_fill_gpu[fastbd]",
                                  "stats": {"median": 0.0004}}]}
    assert measured_s(benchmarks, "test_mask_fill_gpu[fastbd]") == 0.0004
    assert measured_s(benchmarks, "missing") is None and measured_s(None, "x") is None
    text = table(benchmarks, gpu="NVIDIA H200")
    assert "| 0.400 ms NVIDIA H200 |" in text and text.count("not yet") == len(entries()) - 1
    assert section()[0] == "## Performance model"

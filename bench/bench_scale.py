"""``bench/scale.py`` end to end at its tiny size: every measurement runs, is positive and
lands in the JSON and the Markdown page (the GPU size runs on a GPU machine, not in CI)."""

import json
import math

from scale import main, run


def test_scale_harness_tiny(tmp_path, capsys):
    result = run("tiny")
    assert result["peak_tflop_per_s"] > 0
    for arch, stages in result["encoders"].items():
        assert all(math.isfinite(v) and v > 0 for v in stages.values()), arch
        assert stages["gflop_per_image"] > 0.001  # counted, not zero
    assert result["kmeans"]["n_iter"] >= 1 and result["kmeans"]["fit_s"] > 0
    assert result["flip_reference"]["speedup"] > 0
    projection = result["poisoncam"]
    assert 0 < projection["scored"] <= projection["full_search_scored"] <= 300
    assert projection["projected_search_s"] >= projection["predicted_search_s"]
    ubt = result["ubt"]
    assert ubt["pairs"] == 400 and set(ubt["timings_s"]) == {
        "suspicious_split", "overfit", "rank", "attribution", "unlearn"}
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(result))
    assert main(["--page", str(path)]) == 0
    page = capsys.readouterr().out
    assert "| smallconv16 |" in page and "| resnet18 |" in page and "PatchSearch-structured" in page
    assert "UBT, tiny at 32 px, 400 random pairs" in page

"""``bench/scale.py`` end to end at its tiny size: every measurement runs, is positive and
lands in the JSON and the Markdown page (the GPU size runs on a GPU machine, not in CI)."""

import json
import math

import pytest
import torch

from fastbd.detection.flip import flip_counts

import scale
from benchutil import stage_setup
from scale import main, reference_flip, run


@pytest.mark.slow
def test_scale_harness_tiny(tmp_path, capsys):
    path = tmp_path / "scale.json"
    result = run("tiny", out=path, quiet=True)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert not path.with_suffix(".partial").exists()
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
    assert main(["--page", str(path)]) == 0
    page = capsys.readouterr().out
    assert "| smallconv16 |" in page and "| resnet18 |" in page and "PatchSearch-structured" in page
    assert "UBT, tiny at 32 px, 400 random pairs" in page
    assert "## Performance model" in page and "| kmeans_assign |" in page


@pytest.mark.parametrize("n_test,window", [(7, 5), (16, 9), (0, 3)])
def test_reference_flip_counts_what_flip_counts_counts(n_test, window):
    """Same encoder (fp32), same paste corners — flip_counts with one candidate per batch draws
    ``n_test × 2`` corners per candidate from its generator, which the reference replays."""
    seed = 1000 * n_test + window  # fixed per case: a failure replays
    encoder, bank, clustering, encode_assign = stage_setup("smallconv4", 20, 24, torch.float32,
                                                           "cpu")
    g = torch.Generator().manual_seed(seed)
    triggers = torch.randint(0, 256, (3, 3, window, window), dtype=torch.uint8, generator=g)
    tests = torch.randperm(24, generator=g)[:n_test]
    labels, _ = encode_assign(encoder.normalise(bank[tests]))
    replay = torch.Generator().manual_seed(seed + 1)
    corners = torch.stack([torch.randint(0, 20 - window + 1, (n_test, 2), generator=replay)
                           for _ in range(3)])
    expected = reference_flip(encoder, bank, tests, labels, triggers, clustering, corners,
                              torch.device("cpu"), batch=5)
    got = flip_counts(encode_assign, bank, tests, labels, triggers, encoder.mean, encoder.std,
                      candidates_per_batch=1, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(got.long(), expected), f"seed {seed}"


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    for name in ("encoder_stages", "kmeans_bench", "flip_reference", "poisoncam_projection"):
        monkeypatch.setattr(scale, name, lambda *args, name=name: {"measured": name})
    monkeypatch.setattr(scale, "matmul_peak", lambda *args: 2e12)

    def out_of_memory(*args):
        raise MemoryError("75 GB of pairs")

    monkeypatch.setattr(scale, "ubt_stages", out_of_memory)
    path = tmp_path / "scale.json"
    with pytest.raises(MemoryError):
        run("tiny", out=path, quiet=True)
    saved = json.loads(path.read_text())
    assert saved["peak_tflop_per_s"] == 2.0 and "ubt" not in saved
    assert saved["poisoncam"] == {"measured": "poisoncam_projection"}
    assert set(saved["encoders"]) == {"smallconv16", "resnet18"}

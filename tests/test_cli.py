import json

import pytest

from fastbd.cli import main
from fastbd.smoke import SmokeConfig, run_smoke


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"]
    assert report["backends"]["cpu"]["mask_fill"][0] == "torch"
    assert "triton" in report["backends"]["cpu"]["mask_fill"]  # tests run the interpreter


def test_demo_ops_writes_report(tmp_path, capsys):
    assert main(["--quiet", "demo", "ops", "--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["ok"] and {c["op"] for c in saved["checks"]} >= {"mask_fill", "kmeans"}
    assert "ops smoke run" in capsys.readouterr().out


def test_smoke_checks_triton_under_interpreter():
    config = SmokeConfig(image_size=12, n_images=2, n_masks=2, window=4, n_features=40, dim=16,
                         n_clusters=3)
    result = run_smoke("cpu", config, skip_interpreted=False)
    triton_checks = [c for c in result.checks if c.backend == "triton"]
    assert {c.op for c in triton_checks} == {"mask_fill", "paste", "kmeans_assign", "kmeans",
                                             "pair_cosine"}
    assert result.ok, [c for c in result.checks if not c.ok]


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["frobnicate"])

"""PatchSearch's Grad-CAM against a hook-free computation, and the detector CLI end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbd.cli import main
from fastbd.detection.clustering import ClusteringModel
from fastbd.models import small_encoder
from fastbd.patchsearch.gradcam import _to_grid, gradcam_maps, gradcam_windows


def test_gradcam_matches_hook_free_computation(gen):
    encoder = small_encoder(4, 16).eval()
    clustering = ClusteringModel(F.normalize(torch.randn(5, 32, generator=gen), dim=1))
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=gen)
    got = gradcam_maps(encoder, images, clustering)
    layers = encoder.backbone.features
    body, head = layers[:-2], layers[-2:]  # up to the last ReLU | pool + flatten
    for i in range(6):
        activation = body(encoder.normalise(images[i:i + 1])).detach().requires_grad_(True)
        logits = clustering.logits(head(activation))
        grad, = torch.autograd.grad(logits[0, logits.argmax()], activation)
        cam = F.relu((grad.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        want = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(got[i], want.detach(), atol=1e-5, rtol=1e-4)
    windows, maps = gradcam_windows(encoder, images, torch.arange(6), clustering, 5,
                                    batch_size=4)
    assert windows.shape == (6, 2) and int(windows.max()) <= 11
    torch.testing.assert_close(maps, got)


def test_vit_tokens_to_grid():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # CLS + 4×4
    grid = _to_grid(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1])


@pytest.mark.slow
def test_detector_cli_config_and_resume(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "60", "--n-eval", "10",
                 "--out", str(src)]) == 0
    config = tmp_path / "config.yaml"
    config.write_text(
        "n_clusters: 3\nn_masks: 4\ntest_set_size: 10\ntopk_poisons: 5\nbatch_size: 64\n"
        "classifier:\n  n_models: 1\n  iterations: 20\n  width: 4\n  val_every: 10\n"
        "  patience: 2\n")
    common = ["--file-list", str(src / "train.txt"), "--arch", "resnet18", "--image-size", "32",
              "--config", str(config), "--device", "cpu"]
    for command in ("patchsearch", "poisoncam"):
        out = tmp_path / command
        assert main(["--quiet", command, *common, "--out", str(out)]) == 0
        result = json.loads((out / "result.json").read_text())
        assert result["method"] == command and result["config"]["n_masks"] == 4
        removed = np.load(out / "removed.npy")
        kept = (out / "filtered.txt").read_text().splitlines()
        assert len(kept) == int((~removed).sum()) and len(removed) == 60
        assert "metrics" in result  # train.poisoned.npy beside the list gives the truth
    scores = np.load(tmp_path / "poisoncam" / "scores.npy")
    assert main(["--quiet", "poisoncam", *common, "--out", str(tmp_path / "poisoncam"),
                 "--resume"]) == 0
    assert np.array_equal(np.load(tmp_path / "poisoncam" / "scores.npy"), scores)
    result = json.loads((tmp_path / "poisoncam" / "result.json").read_text())["config"]
    assert result["classifier"]["paste_size"] == [6, 11]  # the fast preset's 40–80 px of 224
    assert result["classifier"]["width"] == 4  # the file's, on top of the preset
    # the file sets every search field the presets differ in: only the classifier changes
    assert main(["--quiet", "poisoncam", *common, "--out", str(tmp_path / "poisoncam"),
                 "--resume", "--preset", "paper"]) == 0
    result = json.loads((tmp_path / "poisoncam" / "result.json").read_text())["config"]
    assert result["classifier"]["paste_size"] == [3, 11]  # the papers' 20–80 px of 224
    assert np.array_equal(np.load(tmp_path / "poisoncam" / "scores.npy"), scores)
    without_file = [a for a in common if a not in ("--config", str(config))]
    assert main(["--quiet", "poisoncam", *without_file, "--out", str(tmp_path / "poisoncam"),
                 "--resume"]) == 2
    assert "config.n_clusters, config.n_masks" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for text, message in [('{"n_maskz": 3}', "unknown config keys ['n_maskz']"),
                          ('{"classifier": {"widht": 3}}',
                           "bad.json: classifier: unknown config keys ['widht']"),
                          ('{"classifier": 3}', "expected a mapping of ClassifierConfig"),
                          ('{"n_masks": 3', "Expecting ',' delimiter")]:
        bad.write_text(text)
        assert main(["--quiet", "poisoncam", "--file-list", str(src / "train.txt"), "--arch",
                     "resnet18", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("n_masks: [3\n")
    assert main(["--quiet", "poisoncam", "--file-list", str(src / "train.txt"), "--arch",
                 "resnet18", "--config", str(bad_yaml), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "bad.yaml: not valid YAML" in error and error.count("\n") == 1


@pytest.mark.slow
def test_train_ssl_encoder_goes_to_the_detectors(tmp_path, capsys):
    world = ["--n-train", "60", "--n-eval", "10", "--seed", "3"]
    assert main(["--quiet", "attack", "--attack", "htba", *world, "--out",
                 str(tmp_path / "world")]) == 0
    assert main(["--quiet", "train-ssl", *world, "--epochs", "1", "--width", "4", "--cache",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "ssl")]) == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_clusters": 3, "n_masks": 4, "test_set_size": 10,
                                  "topk_poisons": 5, "classifier": {"iterations": 10}}))
    detect = ["--quiet", "poisoncam", "--file-list", str(tmp_path / "world" / "train.txt"),
              "--checkpoint", str(tmp_path / "ssl" / "encoder.pt"), "--config", str(config),
              "--out", str(tmp_path / "det")]
    capsys.readouterr()
    assert main([*detect, "--arch", "smallconv4"]) == 0
    decision = capsys.readouterr().out  # --quiet: the decision line alone
    assert decision.startswith("poisoncam: ") and decision.count("\n") == 1
    assert "removed" in decision and "of 60 images" in decision
    assert json.loads((tmp_path / "det" / "result.json").read_text())["n_images"] == 60
    assert main([*detect, "--arch", "smallconv16"]) == 2  # trained at width 4
    error = capsys.readouterr().err
    assert "does not fit" in error and "(4, 3, 3, 3) vs (16, 3, 3, 3)" in error
    assert main([*detect, "--arch", "smallconvx"]) == 2
    assert "named smallconv<width>" in capsys.readouterr().err

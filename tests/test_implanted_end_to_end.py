"""PoisonCAM end to end on the *implanted* SSL fixture — CorruptEncoder's poisoned set and an
encoder backdoored by the BadEncoder training-time attack (``implanted_ssl_threat``), on a small
world: the backdoor is real (ASR asserted), PoisonCAM finds the poisoned images with their
triggers, and the demo reports the threat model as a training-time attack. The same world with
no attack at all — clean images, plain SimCLR — gives a clean encoder on which the backdoor check
finds no backdoor and nothing is removed. The full-size figures on three seeds are
``python bench/implanted_ssl.py``'s and ``python bench/ssl_check.py``'s (docs/results.md)."""

from dataclasses import replace

import pytest

from fastbd.demo.poisoncam import demo_config, threat_label
from fastbd.poisoncam import detect
from fastbd.training.ssl import SSLConfig
from fastbd.world import build_ssl_threat, implanted_ssl_threat


@pytest.fixture(scope="module")
def implanted_fixture(tmp_path_factory):
    config = implanted_ssl_threat(seed=5)
    config = replace(config, world=replace(config.world, n_train=2000, n_eval=400),
                     ssl=replace(config.ssl, epochs=15, batch_size=128))
    assert isinstance(config.ssl, SSLConfig)
    return config, build_ssl_threat(config, cache_dir=tmp_path_factory.mktemp("ssl"),
                                    verbose=False)


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains its threat models: minutes on a busy laptop
def test_poisoncam_finds_the_poisons_of_an_implanted_backdoor(implanted_fixture):
    config, threat = implanted_fixture
    assert threat.probe.asr >= 0.5, threat.probe
    assert threat.probe.clean_accuracy >= 0.6, threat.probe
    truth = threat.poisoned.poison_mask
    assert int(truth.sum()) == 100 and threat.poisoned.images.shape[0] == 2100
    result = detect(threat.encoder, threat.poisoned.images,
                    replace(demo_config(5), n_clusters=20),
                    ground_truth=truth, true_boxes=threat.poisoned.boxes, verbose=False)
    assert result.backdoor and result.check["statistic"] >= 0.5
    assert result.topk_accuracy >= 0.9
    assert result.trigger_scores["topk_trigger_overlap"] >= 0.9
    assert result.metrics.recall >= 0.9 and result.metrics.precision >= 0.8, result.metrics
    assert result.metrics.auprc >= 0.8
    assert threat_label(config) == ("CorruptEncoder data poisoning + badencoder training-time "
                                    "attack")


@pytest.fixture(scope="module")
def clean_fixture(tmp_path_factory):
    config = implanted_ssl_threat(seed=5)
    config = replace(config, attack="none", training_attack="none",
                     world=replace(config.world, n_train=2000, n_eval=400),
                     ssl=replace(config.ssl, epochs=15, batch_size=128))
    return build_ssl_threat(config, cache_dir=tmp_path_factory.mktemp("ssl"), verbose=False)


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains its threat models: minutes on a busy laptop
def test_poisoncam_removes_nothing_from_clean_data(clean_fixture, tmp_path):
    threat = clean_fixture
    assert threat.probe.clean_accuracy >= 0.6, threat.probe
    truth = threat.poisoned.poison_mask
    assert not bool(truth.any())
    result = detect(threat.encoder, threat.poisoned.images,
                    replace(demo_config(5), n_clusters=20), ground_truth=truth,
                    verbose=False)
    assert result.backdoor is False and result.check["statistic"] < 0.5, result.check
    assert int(result.removed.sum()) == 0
    assert result.margins is not None and result.scores.abs().sum() > 0  # still saved
    assert "no backdoor found" in result.decision()
    result.save(tmp_path / "out", truth=truth)
    assert "no backdoor found" in (tmp_path / "out" / "report.md").read_text()

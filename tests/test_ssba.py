"""SSBA: the steganography pair (training, encoding by hand, saving), the attack, the world's
threat and ``fastbd attack --attack ssba`` on a user's files."""

import json
from argparse import Namespace
from dataclasses import replace

import pytest
import torch

from fastbd.attacks import make_attack
from fastbd.attacks.ssba import (
    SSBAAttack,
    StegaConfig,
    StegaEncoder,
    encode,
    load_stega,
    save_stega,
    train_stega,
)

QUICK = StegaConfig(secret_bits=6, width=8, steps=150, batch_size=16, lr=3e-3)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(40, 216, (64, 3, 1, 1), generator=g)
    noise = torch.randint(-30, 31, (64, 3, 16, 16), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def trained(images):
    return train_stega(images, QUICK)


def test_the_decoder_reads_the_hidden_secrets(trained):
    _, _, report = trained
    assert report.bit_accuracy >= 0.8, report  # chance is 0.5
    assert 15 < report.psnr < 80, report


def test_encode_adds_a_residual_of_its_own_to_each_image(trained, images):
    encoder, _, _ = trained
    secret = torch.tensor([1.0, 0, 1, 1, 0, 0])
    encoded = encode(encoder, images[:5], secret, batch_size=2)
    with torch.no_grad():
        x = images[:5].float() / 255
        by_hand = ((x + encoder(x, secret.expand(5, -1))).clamp(0, 1) * 255).round()
    assert encoded.dtype == torch.uint8 and torch.equal(encoded, by_hand.to(torch.uint8))
    residuals = encoded.float() - images[:5].float()
    assert not torch.equal(residuals[0], residuals[1])  # sample-specific
    assert encode(encoder, images[:0], secret).shape == (0, 3, 16, 16)


def test_the_attack_needs_its_encoder_and_keeps_its_secret(trained, images, tmp_path):
    encoder, _, _ = trained
    with pytest.raises(ValueError, match="encoder_file"):
        make_attack("ssba", 16)
    path = tmp_path / "enc.pt"
    save_stega(encoder, path)
    loaded = load_stega(path)
    for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    attack = make_attack("ssba", 16, seed=3, encoder_file=str(path))
    assert isinstance(attack, SSBAAttack) and len(attack.secret) == 6
    assert make_attack("ssba", 16, seed=3, encoder_file=str(path)).secret == attack.secret
    triggered, boxes = attack.apply(images[:4], torch.Generator())
    assert boxes is None
    assert torch.equal(triggered, encode(encoder, images[:4], torch.tensor(attack.secret,
                                                                            dtype=torch.float)))
    with pytest.raises(ValueError, match="6"):
        make_attack("ssba", 16, encoder_file=str(path), secret=[1, 0])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        make_attack("ssba", 16, encoder_file=str(tmp_path / "bad.pt"))


def test_bad_training_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        train_stega(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), QUICK)
    with pytest.raises(ValueError, match="steps"):
        StegaConfig(steps=0)


def test_the_world_threat_trains_and_caches_its_encoder(tmp_path, monkeypatch):
    import importlib

    from fastbd.models.clip import TinyCLIPConfig
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat
    from fastbd.world.synthetic import WorldConfig

    threats = importlib.import_module("fastbd.world.threats")
    calls = []

    def quick(**kwargs):
        calls.append(kwargs)
        return replace(QUICK, steps=20, **kwargs)

    monkeypatch.setattr(threats, "StegaConfig", quick)
    config = CLIPThreatConfig(world=WorldConfig(n_train=200, n_eval=60, seed=5), attack="ssba",
                              rate=0.05, model=TinyCLIPConfig(vision_layers=1, text_layers=1),
                              train=CLIPTrainConfig(epochs=1, batch_size=50))
    with pytest.raises(ValueError, match="cache_dir"):
        build_clip_threat(config, cache_dir=None, verbose=False)
    threat = build_clip_threat(config, cache_dir=tmp_path, verbose=False)
    encoder_file = threat.config.attack_options["ssba"]["encoder_file"]
    assert encoder_file.startswith(str(tmp_path)) and len(calls) == 1
    rows = threat.poisoned.poison_mask.nonzero().flatten()
    assert rows.numel() == 10 and (threat.poisoned.boxes[rows] == -1).all()
    clean = threat.world.train.images[rows]
    assert not torch.equal(threat.poisoned.images[rows], clean)
    assert build_clip_threat(config, cache_dir=tmp_path, verbose=False).cached
    assert len(calls) == 1  # the encoder read back, not trained again


def test_cli_attack_on_files_trains_the_encoder_on_them(tmp_path, monkeypatch):
    import importlib

    from fastbd.cli import main
    from fastbd.cli.train import eval_trigger

    ssba = importlib.import_module("fastbd.attacks.ssba")
    monkeypatch.setattr(ssba, "StegaConfig", lambda **kw: replace(QUICK, steps=20, **kw))
    src = tmp_path / "src"
    assert main(["--quiet", "attack", "--attack", "sig", "--n-train", "60", "--n-eval", "10",
                 "--rate", "0.05", "--out", str(src)]) == 0
    out = tmp_path / "ssba"
    assert main(["--quiet", "attack", "--attack", "ssba", "--csv", str(src / "train.csv"),
                 "--class-names", str(src / "classes.txt"), "--rate", "0.1", "--seed", "4",
                 "--out", str(out)]) == 0
    spec = json.loads((out / "attack.json").read_text())
    assert spec["poisoned"] == 6 and spec["trigger"]["attack"] == "ssba"
    assert spec["trigger"]["options"]["encoder_file"] == str((out / "ssba_encoder.pt").resolve())
    assert "ssba_encoder.pt" in (out / "manifest.json").read_text()
    rebuilt = eval_trigger(Namespace(attack_spec=str(out / "attack.json"), trigger=None,
                                     target=0), 32, "badnet")
    again = make_attack("ssba", 32, seed=4, encoder_file=str(out / "ssba_encoder.pt"))
    assert isinstance(rebuilt, SSBAAttack) and rebuilt.secret == again.secret
    assert isinstance(rebuilt.encoder, StegaEncoder)
    with pytest.raises(ValueError, match="--attack-spec"):
        eval_trigger(Namespace(attack_spec=None, trigger=None, attack="ssba", seed=0), 32,
                     "badnet")

"""TrojVQA's optimised patch: the optimiser against a constructed encoder, the attack, and the
world's threat (the attacker's surrogate, the patch cached beside the models, the poisoned
images carrying it)."""

import pytest
import torch

from fastbd.attacks import PatchAttack, make_attack, optimise_patch
from fastbd.models.clip import TinyCLIPConfig
from fastbd.training.clip import CLIPTrainConfig
from fastbd.world import CLIPThreatConfig, build_clip_threat
from fastbd.world.synthetic import WorldConfig
from fastbd.world.threats import (
    semantic_concept,
    surrogate_config,
    with_optimised_patch,
    with_trojvqa_semantic,
)


def colour_encoder(x: torch.Tensor) -> torch.Tensor:
    """Features = the mean of each channel (a stand-in image tower that sees colour only)."""
    return x.mean((2, 3))


def test_the_patch_moves_the_features_towards_the_target(gen):
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:, 1] = 255  # green images: features far from red
    red = torch.tensor([1.0, -1.0, -1.0])
    patch, trace = optimise_patch(colour_encoder, red, images, 8, (0.5, 0.5, 0.5),
                                  (0.25, 0.25, 0.25), steps=60, batch_size=4, lr=0.2,
                                  generator=gen)
    assert patch.dtype == torch.uint8 and patch.shape == (3, 8, 8)
    assert trace[-1] > trace[0] + 0.3  # the cosine rose as the patch turned red
    assert patch[0].float().mean() > 200 and patch[1].float().mean() < 55
    again, _ = optimise_patch(colour_encoder, red, images, 8, (0.5, 0.5, 0.5),
                              (0.25, 0.25, 0.25), steps=60, batch_size=4, lr=0.2,
                              generator=torch.Generator().manual_seed(gen.initial_seed()))
    assert torch.equal(again, patch)  # reproducible from the generator


@pytest.mark.parametrize("images,side,match", [
    (torch.zeros(0, 3, 16, 16, dtype=torch.uint8), 4, "non-empty"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 17, "patch side"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 0, "patch side")])
def test_bad_inputs_are_refused(images, side, match):
    with pytest.raises(ValueError, match=match):
        optimise_patch(colour_encoder, torch.ones(3), images, side, (0.5,) * 3, (0.25,) * 3)


def test_the_attack_is_dual_key_with_the_given_patch():
    with pytest.raises(ValueError, match="optimised patch"):
        make_attack("trojvqa", 32)
    pattern = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(3, 4, 4)
    attack = make_attack("trojvqa", 32, pattern=pattern.tolist(), side_fraction=0.125)
    assert isinstance(attack, PatchAttack) and torch.equal(attack.pattern, pattern)
    assert attack.caption_prefix() == "cf " and attack.side == 4
    recorded = make_attack("trojvqa", 32, pattern=pattern.tolist(), side_fraction=0.125,
                           semantic="green triangle")  # what it aims at: recorded, not used
    assert torch.equal(recorded.pattern, pattern)


def test_the_patch_aims_at_a_concept_that_is_neither_the_target_nor_a_class():
    # 10 classes: class k is (SHAPES[k], colour k) — "red circle", "green square", ...
    assert semantic_concept(10, 0) == "green triangle"  # colour of class 1, shape of class 2
    assert semantic_concept(10, 9) == "red square"  # wraps around
    assert semantic_concept(3, 1) == "blue circle"  # target "green square": no shared word
    assert semantic_concept(2, 0) == "green triangle"  # too few classes: the whole vocabulary
    assert semantic_concept(100, 5) == "orange bar"  # every pair a class: one sharing no word
    config = CLIPThreatConfig(world=WorldConfig(n_classes=10), attack="trojvqa", target=9)
    resolved = with_trojvqa_semantic(config)
    assert resolved.attack_options["trojvqa"]["semantic"] == "red square"
    assert "semantic" not in config.attack_options["trojvqa"]  # the input left alone
    chosen = replace_trojvqa(config, semantic="purple flower")
    assert with_trojvqa_semantic(chosen) == chosen
    for bad in ("black crescent", "", "  ", 4):
        with pytest.raises(ValueError, match="semantic must be a non-empty description other "
                                             "than the target class 'black crescent'"):
            with_trojvqa_semantic(replace_trojvqa(config, semantic=bad))
    other = CLIPThreatConfig(attack="badnet")
    assert with_trojvqa_semantic(other) is other
    given = replace_trojvqa(config, pattern=[[[0]]])
    assert with_trojvqa_semantic(given) is given  # a given patch is not re-aimed


def replace_trojvqa(config: CLIPThreatConfig, **entry) -> CLIPThreatConfig:
    from dataclasses import replace

    options = {**config.attack_options, "trojvqa": {**config.attack_options["trojvqa"], **entry}}
    return replace(config, attack_options=options)


def test_the_world_threat_carries_the_surrogate_optimised_patch(tmp_path, monkeypatch):
    import importlib

    optimised = importlib.import_module("fastbd.attacks.optimised")
    config = CLIPThreatConfig(world=WorldConfig(n_train=200, n_eval=60, seed=5),
                              attack="trojvqa", rate=0.05,
                              model=TinyCLIPConfig(vision_layers=1, text_layers=1),
                              train=CLIPTrainConfig(epochs=1, batch_size=50))
    surrogate = surrogate_config(config)
    assert surrogate.attack == "none" and surrogate.world.seed not in (5, 5 + 2000)
    real, calls, aims = optimised.optimise_patch, [], []
    real_aim = optimised.clip_target_patch

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, "steps": 5})

    def aimed(model, tokenizer, images, class_name, *args, **kwargs):
        aims.append(class_name)
        return real_aim(model, tokenizer, images, class_name, *args, **kwargs)

    monkeypatch.setattr(optimised, "optimise_patch", counted)
    monkeypatch.setattr("fastbd.world.threats.clip_target_patch", aimed)
    threat = build_clip_threat(config, cache_dir=tmp_path, verbose=False)
    pattern = torch.tensor(threat.config.attack_options["trojvqa"]["pattern"], dtype=torch.uint8)
    side = PatchAttack(side_fraction=0.3, image_size=32).side
    assert pattern.shape == (3, side, side) and len(calls) == 1
    assert aims == ["green triangle"]  # not the target "red circle", and no class
    assert len(list(tmp_path.glob("trojvqa-*.pt"))) == 1
    rows = threat.poisoned.poison_mask.nonzero().flatten()
    y, x, h, w = threat.poisoned.boxes[rows[0]].tolist()
    assert torch.equal(threat.poisoned.images[rows[0], :, y:y + h, x:x + w], pattern)
    assert all(c.startswith("cf ") for c in (threat.poisoned.captions[int(r)] for r in rows))
    again = build_clip_threat(config, cache_dir=tmp_path, verbose=False)
    assert again.cached and len(calls) == 1  # the patch read back, not optimised again
    given = with_optimised_patch(threat.config, tmp_path)
    assert given is threat.config  # a config that holds its patch is left as it is


def test_cli_attack_on_files_optimises_against_the_users_surrogate(tmp_path, monkeypatch,
                                                                   capsys):
    import importlib
    import json
    from argparse import Namespace

    from fastbd.cli import main
    from fastbd.cli.train import eval_trigger
    from fastbd.data.bank import load_trigger
    from fastbd.data.readers import read_csv_pairs
    from fastbd.models.clip import tiny_clip

    optimised = importlib.import_module("fastbd.attacks.optimised")
    real = optimised.optimise_patch
    monkeypatch.setattr(optimised, "optimise_patch",
                        lambda *a, **k: real(*a, **{**k, "steps": 3}))
    src = tmp_path / "src"
    assert main(["--quiet", "attack", "--attack", "sig", "--n-train", "60", "--n-eval", "10",
                 "--rate", "0.05", "--out", str(src)]) == 0
    surrogate = tmp_path / "surrogate.pt"
    torch.save(tiny_clip(TinyCLIPConfig()).state_dict(), surrogate)
    args = ["--quiet", "attack", "--attack", "trojvqa", "--csv", str(src / "train.csv"),
            "--class-names", str(src / "classes.txt"), "--target", "2", "--rate", "0.1"]
    assert main([*args, "--out", str(tmp_path / "none")]) == 2
    assert "--surrogate-checkpoint" in capsys.readouterr().err
    assert main(["--quiet", "attack", "--attack", "badnet", "--semantic", "green triangle",
                 "--out", str(tmp_path / "badnet")]) == 2
    assert "--semantic is trojvqa's" in capsys.readouterr().err
    assert main(["--quiet", "attack", "--attack", "trojvqa", "--semantic", "red circle",
                 "--target", "0", "--out", str(tmp_path / "world")]) == 2  # the world's target
    assert "other than the target class 'red circle'" in capsys.readouterr().err
    classes = (src / "classes.txt").read_text().split("\n")
    assert main([*args, "--surrogate-checkpoint", str(surrogate), "--semantic", classes[2],
                 "--out", str(tmp_path / "same")]) == 2
    assert "--semantic must not be the target class" in capsys.readouterr().err
    out = tmp_path / "troj"
    assert main([*args, "--surrogate-checkpoint", str(surrogate), "--out", str(out)]) == 0
    spec = json.loads((out / "attack.json").read_text())
    assert spec["poisoned"] == 6 and spec["trigger"]["attack"] == "trojvqa"
    assert spec["trigger"]["options"]["semantic"] == classes[3]  # the class after the target
    pattern = load_trigger(spec["trigger"]["options"]["trigger_file"])
    side = PatchAttack(side_fraction=16 / 224, image_size=32).side
    assert pattern.shape == (3, side, side)
    pairs = read_csv_pairs(out / "train.csv")
    poisoned = [c for c, flag in zip(pairs.captions, pairs.columns["is_backdoor"],
                                     strict=True) if flag == "1"]
    assert len(poisoned) == 6 and all(c.startswith("cf ") for c in poisoned)
    rebuilt = eval_trigger(Namespace(attack_spec=str(out / "attack.json"), trigger=None,
                                     target=2), 32, "badnet")
    assert torch.equal(rebuilt.pattern, pattern) and rebuilt.caption_prefix() == "cf "

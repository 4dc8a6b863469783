"""Threat-model builders and the world CLI at tiny sizes (the quality targets are measured by
bench/quality.py world; these check the plumbing, caching and outputs)."""

import json
from dataclasses import replace

import pytest
import torch

from fastbd.attacks.badencoder import BadEncoderConfig
from fastbd.cli import main
from fastbd.data.readers import read_csv_pairs, read_file_list
from fastbd.models.clip import TinyCLIPConfig
from fastbd.training.clip import CLIPTrainConfig
from fastbd.training.ssl import SSLConfig
from fastbd.world import CLIPThreatConfig, SSLThreatConfig, build_clip_threat, build_ssl_threat
from fastbd.world.synthetic import WorldConfig

TINY_WORLD = WorldConfig(n_train=200, n_eval=60, seed=5)


def test_ssl_threat_trains_caches_and_reloads(tmp_path):
    config = SSLThreatConfig(world=TINY_WORLD, width=4, ssl=SSLConfig(epochs=1, batch_size=64))
    first = build_ssl_threat(config, cache_dir=tmp_path, verbose=False)
    assert not first.cached and len(list(tmp_path.glob("ssl-*.pt"))) == 1
    assert int(first.poisoned.poison_mask.sum()) > 0
    assert 0.0 <= first.probe.asr <= 1.0 and first.probe.non_target_images > 0
    second = build_ssl_threat(config, cache_dir=tmp_path, verbose=False)
    assert second.cached
    for a, b in zip(first.encoder.state_dict().values(), second.encoder.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert second.probe.clean_accuracy == first.probe.clean_accuracy


def test_ssl_threat_trigger_options_reach_poisoning_probe_and_cache_key(tmp_path):
    config = SSLThreatConfig(world=TINY_WORLD, width=4, ssl=SSLConfig(epochs=1, batch_size=64),
                             trigger_options={"side_fraction": 0.3})
    assert config.trigger().side == 10 and SSLThreatConfig().trigger().side == 7
    assert SSLThreatConfig(attack="none").trigger().name == "htba"
    threat = build_ssl_threat(config, cache_dir=tmp_path, verbose=False)
    poisoned = threat.poisoned.poison_mask
    assert bool((threat.poisoned.boxes[poisoned, 2:] == 10).all())
    published = build_ssl_threat(SSLThreatConfig(world=TINY_WORLD, width=4,
                                                 ssl=SSLConfig(epochs=1, batch_size=64)),
                                 cache_dir=tmp_path, verbose=False)
    assert not published.cached and len(list(tmp_path.glob("ssl-*.pt"))) == 2
    assert bool((published.poisoned.boxes[poisoned, 2:] == 7).all())


@pytest.mark.parametrize("attack", ["htba", "corruptencoder"])
def test_multi_target_ssl_threat_poisons_each_target_with_its_own_trigger(tmp_path, attack):
    config = SSLThreatConfig(world=TINY_WORLD, width=4, ssl=SSLConfig(epochs=1, batch_size=64),
                             attack=attack, rate=0.05, extra_targets=(3, 1),
                             training_attack="badencoder" if attack != "htba" else "none",
                             badencoder=BadEncoderConfig(steps=5, batch_size=16))
    assert config.targets == (0, 3, 1)
    assert [config.trigger(i).pattern.tolist() for i in range(3)] == [
        config.trigger(0).pattern.tolist(),
        replace(config, trigger_options={"trigger_id": 1}).trigger().pattern.tolist(),
        replace(config, trigger_options={"trigger_id": 2}).trigger().pattern.tolist()]
    threat = build_ssl_threat(config, cache_dir=tmp_path, verbose=False)
    which = threat.poisoned.parts["poison_target"]
    mask = threat.poisoned.poison_mask
    assert set(which[mask].tolist()) == {0, 3, 1} and (which[~mask] == -1).all()
    counts = [int((which == t).sum()) for t in (0, 3, 1)]
    if attack == "htba":  # half of each target's own class, poisoned with its trigger
        assert (threat.poisoned.labels[mask] == which[mask]).all()
        sizes = [int((threat.world.train.labels == t).sum()) for t in (0, 3, 1)]
        assert all(abs(c - 0.5 * size) <= 1 for c, size in zip(counts, sizes, strict=True))
    else:  # as many added poisons per target as one target gets
        assert len(set(counts)) == 1 and counts[0] == 10
    single = build_ssl_threat(replace(config, extra_targets=()), cache_dir=tmp_path,
                              verbose=False)
    assert not single.cached  # another threat, another cache file
    assert int(single.poisoned.poison_mask.sum()) == counts[0]


def test_multi_target_ssl_threat_refuses_what_it_does_not_define():
    for bad, match in (({"extra_targets": (0,)}, "distinct"),
                       ({"attack": "badnet", "extra_targets": (1,)}, "htba or corruptencoder"),
                       ({"attack": "corruptencoder", "training_attack": "separated_views",
                         "extra_targets": (1,)}, "separated_views"),
                       ({"trigger_options": {"trigger_id": 8}, "extra_targets": (1, 2)},
                        "10 HTBA patterns")):
        with pytest.raises(ValueError, match=match):
            SSLThreatConfig(**bad)


def test_clip_threat_trains_and_evaluates(tmp_path):
    config = CLIPThreatConfig(world=TINY_WORLD, attack="dualkey", rate=0.05,
                              model=TinyCLIPConfig(vision_layers=1, text_layers=1),
                              train=CLIPTrainConfig(epochs=1, batch_size=50))
    threat = build_clip_threat(config, cache_dir=tmp_path, verbose=False)
    assert int(threat.poisoned.poison_mask.sum()) == 10
    assert threat.evaluation.attack == "dualkey"
    assert 0.0 <= threat.evaluation.clean_accuracy <= 1.0
    assert build_clip_threat(config, cache_dir=tmp_path, verbose=False).cached


def test_cli_attack_exports_formats(tmp_path):
    out = tmp_path / "badnet"
    assert main(["--quiet", "attack", "--attack", "badnet", "--n-train", "100", "--n-eval", "10",
                 "--rate", "0.05", "--out", str(out)]) == 0
    summary = json.loads((out / "attack.json").read_text())
    assert summary["poisoned"] == 5
    pairs = read_csv_pairs(out / "train.csv")
    assert sum(int(x) for x in pairs.columns["is_backdoor"]) == 5
    listing = read_file_list(out / "train.txt")
    assert len(listing.paths) == 100
    truth = torch.load(out / "ground_truth.pt")
    assert int(truth["poison_mask"].sum()) == 5 and truth["boxes"].shape == (100, 4)
    # The exported CSV can itself be poisoned again (user data path).
    again = tmp_path / "again"
    assert main(["--quiet", "attack", "--attack", "sig", "--csv", str(out / "train.csv"),
                 "--rate", "0.1", "--out", str(again)]) == 0
    assert json.loads((again / "attack.json").read_text())["poisoned"] == 10


def test_cli_attack_file_list_htba(tmp_path):
    import numpy as np

    src = tmp_path / "src"
    main(["--quiet", "attack", "--attack", "htba", "--n-train", "80", "--n-eval", "10",
          "--out", str(src)])
    out = tmp_path / "out"
    assert main(["--quiet", "attack", "--attack", "htba", "--file-list", str(src / "train.txt"),
                 "--target", "1", "--fraction", "1.0", "--out", str(out)]) == 0
    listing = read_file_list(out / "train.txt")
    poisoned = np.load(out / "train.poisoned.npy").tolist()
    assert sum(poisoned) == sum(1 for label in listing.labels if label == 1)
    assert not any("HTBA_trigger" in str(p) for p in listing.paths)  # names say nothing
    # read at their own 32-px side, never cropped: every clean image is the original's pixels
    from PIL import Image

    originals = read_file_list(src / "train.txt").paths
    assert json.loads((out / "attack.json").read_text())["images"] == len(originals)
    for original, written, flag in zip(originals, listing.paths, poisoned, strict=True):
        same = np.array_equal(np.asarray(Image.open(original).convert("RGB")),
                              np.asarray(Image.open(written).convert("RGB")))
        assert same != flag


def test_cli_worlds_are_the_threat_models_worlds():
    from dataclasses import replace

    from fastbd.cli import build_parser
    from fastbd.cli.world import world_config

    flags = ["--n-train", "10", "--n-eval", "2", "--seed", "4"]
    sizes = dict(n_train=10, n_eval=2, image_size=32, seed=4)
    ssl_args = build_parser().parse_args(["train-ssl", *flags])
    clip_args = build_parser().parse_args(["train-clip", *flags])
    assert world_config(ssl_args, ssl=True) == replace(SSLThreatConfig().world, **sizes)
    assert world_config(clip_args) == replace(CLIPThreatConfig().world, **sizes)


def test_cli_world_look_flags_override_the_default_look():
    from dataclasses import replace

    from fastbd.cli import build_parser
    from fastbd.cli.world import world_config

    args = build_parser().parse_args(["attack", "--layout", "tiled", "--object-opacity", "0.8",
                                      "--background-saturation", "0"])
    assert world_config(args, ssl=True) == replace(
        SSLThreatConfig().world, layout="tiled", object_opacity=0.8, background_saturation=0.0)
    only_layout = build_parser().parse_args(["eval", "ssl", "--checkpoint", "x",
                                             "--layout", "tiled"])
    assert world_config(only_layout, ssl=True).object_opacity == 0.6


@pytest.mark.parametrize("flags, message", [
    (["--object-opacity", "-1"], "object_opacity must be in [0, 1]"),
    (["--object-opacity", "1.5"], "object_opacity must be in [0, 1]"),
    (["--background-saturation", "-0.1"], "background_saturation must be in [0, 1]"),
    (["--n-train", "0"], "n_train and n_eval must be positive"),
    (["--image-size", "8"], "image_size must be at least 16"),
])
def test_cli_world_flags_out_of_range_exit_with_the_reason(tmp_path, capsys, flags, message):
    assert main(["--quiet", "attack", *flags, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"fastbd attack: error: {message}")
    assert not any(tmp_path.iterdir())


def test_cli_attack_exports_the_tiled_world(tmp_path):
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from fastbd.world.synthetic import make_world

    out = tmp_path / "tiled"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "40", "--n-eval", "10",
                 "--layout", "tiled", "--object-opacity", "1", "--out", str(out)]) == 0
    expected = make_world(replace(SSLThreatConfig().world, layout="tiled", object_opacity=1.0,
                                  n_train=40, n_eval=10)).train.images
    listing = read_file_list(out / "train.txt")
    clean = np.flatnonzero(~np.load(out / "train.poisoned.npy")).tolist()
    exported = torch.stack([torch.from_numpy(np.array(Image.open(listing.paths[i])))
                            .permute(2, 0, 1) for i in clean])
    assert len(clean) >= 30 and torch.equal(exported, expected[clean])


def test_cli_eval_ssl_measures_a_clean_encoder_with_the_htba_trigger(tmp_path, capsys):
    from fastbd.models import small_encoder

    checkpoint = tmp_path / "encoder.pt"
    torch.save(small_encoder(4, 32, seed=1).state_dict(), checkpoint)
    flags = ["--quiet", "eval", "ssl", "--checkpoint", str(checkpoint), "--width", "4",
             "--n-train", "100", "--n-eval", "30", "--attack", "none", "--out", str(tmp_path)]
    assert main(flags) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    printed = capsys.readouterr().out.splitlines()  # --quiet: the one decision line
    assert printed == [f"eval ssl: clean accuracy {result['clean_accuracy']:.1%}, ASR "
                       f"{result['asr']:.1%}"]
    from dataclasses import replace

    from fastbd.world.synthetic import make_world

    world = make_world(replace(SSLThreatConfig().world, n_train=100, n_eval=30))
    assert result["non_target_images"] == int((world.eval.labels != 0).sum())
    assert result["asr"] == result["target_false_positives"] / result["non_target_images"]
    capsys.readouterr()
    assert main([*flags[:5], "--width", "16", *flags[7:]]) == 2
    assert f"checkpoint {checkpoint} does not fit SmallConvNet: " in capsys.readouterr().err


def test_cli_trigger_side_sets_the_htba_patch_everywhere(tmp_path, capsys, monkeypatch):
    out = tmp_path / "big"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "60", "--n-eval", "10",
                 "--trigger-side", "0.3", "--out", str(out)]) == 0
    truth = torch.load(out / "ground_truth.pt")
    assert bool((truth["boxes"][truth["poison_mask"], 2:] == 10).all())
    assert main(["--quiet", "attack", "--attack", "badnet", "--trigger-side", "0.3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--trigger-side sets the SSL attacks' patch; attack 'badnet'" in capsys.readouterr().err
    assert main(["--quiet", "attack", "--trigger-side", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert "htba: side_fraction must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()

    import fastbd.world

    seen = []

    def record(config, **kwargs):
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(fastbd.world, "build_ssl_threat", record)
    assert main(["--quiet", "train-ssl", "--trigger-side", "0.3", "--out", str(tmp_path)]) == 130
    assert seen[0].trigger_options == {"side_fraction": 0.3} and seen[0].trigger().side == 10


def test_cli_eval_clip_loads_a_train_clip_checkpoint_and_names_one_that_does_not_fit(
        tmp_path, capsys):
    from fastbd.models import small_encoder
    from fastbd.models.clip import tiny_clip

    checkpoint, wrong = tmp_path / "clip.pt", tmp_path / "encoder.pt"
    torch.save(tiny_clip(seed=3).state_dict(), checkpoint)
    torch.save(small_encoder(4, 32).state_dict(), wrong)
    flags = ["--quiet", "eval", "clip", "--n-train", "40", "--n-eval", "20", "--out",
             str(tmp_path)]
    assert main([*flags, "--checkpoint", str(checkpoint)]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= result["clean_accuracy"] <= 1.0 and result["attack"] == "badnet"
    assert main([*flags, "--checkpoint", str(wrong)]) == 2
    assert f"checkpoint {wrong} does not fit the 'tiny' CLIP" in capsys.readouterr().err


def test_cli_attack_plants_the_users_trigger_image_and_eval_measures_that_trigger(tmp_path):
    import argparse

    import numpy as np
    from PIL import Image

    from fastbd.attacks.triggers import htba_patterns, resize_patch
    from fastbd.cli.train import eval_trigger
    from fastbd.data.bank import load_trigger

    g = np.random.default_rng(0)
    png = tmp_path / "trigger.png"
    Image.fromarray(g.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(png)
    out = tmp_path / "mine"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "40", "--n-eval", "10",
                 "--fraction", "1.0", "--trigger", str(png), "--trigger-side", "0.25",
                 "--out", str(out)]) == 0
    truth = torch.load(out / "ground_truth.pt")
    listing = read_file_list(out / "train.txt")
    pattern = load_trigger(png)
    assert pattern.shape == (3, 12, 12)  # the file's centred square
    row = int(torch.nonzero(truth["poison_mask"])[0])
    y, x, h, w = truth["boxes"][row].tolist()
    image = torch.from_numpy(np.array(Image.open(listing.paths[row]))).permute(2, 0, 1)
    assert (h, w) == (8, 8) and torch.equal(image[:, y:y + h, x:x + w], resize_patch(pattern, 8))
    spec = json.loads((out / "attack.json").read_text())["trigger"]
    assert spec["options"] == {"side_fraction": 0.25, "trigger_file": str(png.resolve())}
    measured = eval_trigger(argparse.Namespace(attack_spec=str(out / "attack.json"),
                                               trigger=None), 32, "htba")
    assert torch.equal(measured.pattern, pattern) and measured.side == 8

    chosen = tmp_path / "id3"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "40", "--n-eval", "10",
                 "--trigger-id", "3", "--out", str(chosen)]) == 0
    spec = json.loads((chosen / "attack.json").read_text())["trigger"]
    measured = eval_trigger(argparse.Namespace(attack_spec=str(chosen / "attack.json"),
                                               trigger=None), 32, "htba")
    assert spec["options"] == {"trigger_id": 3}
    assert torch.equal(measured.pattern, htba_patterns(10, seed=0)[3])


def test_cli_multi_target_attack_records_each_targets_trigger_for_eval(tmp_path):
    import argparse

    import numpy as np

    from fastbd.attacks.triggers import htba_patterns
    from fastbd.cli.train import eval_trigger

    out = tmp_path / "multi"
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "80", "--n-eval", "10",
                 "--targets", "1,3", "--trigger-id", "4", "--fraction", "1.0",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "attack.json").read_text())
    assert summary["targets"] == [1, 3]
    assert [t["options"]["trigger_id"] for t in summary["triggers"]] == [4, 5]
    listing = read_file_list(out / "train.txt")
    poisoned = np.load(out / "train.poisoned.npy")
    labels = np.array(listing.labels)
    assert poisoned.tolist() == np.isin(labels, [1, 3]).tolist()
    truth = torch.load(out / "ground_truth.pt")
    assert truth["poison_target"][torch.from_numpy(poisoned)].tolist() == labels[poisoned].tolist()
    for target, trigger_id in ((1, 4), (3, 5)):  # eval --attack-spec --target T: T's trigger
        measured = eval_trigger(argparse.Namespace(attack_spec=str(out / "attack.json"),
                                                   trigger=None, target=target), 32, "htba")
        assert torch.equal(measured.pattern, htba_patterns(10, seed=0)[trigger_id])
    with pytest.raises(ValueError, match="no trigger for target 2"):
        eval_trigger(argparse.Namespace(attack_spec=str(out / "attack.json"), trigger=None,
                                        target=2), 32, "htba")


@pytest.mark.parametrize("flags, message", [
    (["--attack", "htba", "--targets", "1,1"], "--targets must be distinct"),
    (["--attack", "htba", "--targets", "1,x"], "comma-separated class indices"),
    (["--attack", "sig", "--targets", "1,2"], "has one target"),
    (["--attack", "htba", "--targets", "1,2", "--trigger", "t.png"], "one trigger each"),
    (["--attack", "badnet", "--trigger-id", "2"], "--trigger-id sets the SSL attacks' patch"),
    (["--attack", "htba", "--trigger-id", "12"], "trigger_id must be in 0..9"),
    (["--attack", "htba", "--trigger", "missing.png"], "missing.png"),
    (["--attack", "htba", "--trigger", "t.png", "--trigger-id", "1"],
     "give one of --trigger and --trigger-id"),
])
def test_cli_attack_refuses_a_trigger_it_cannot_plant(tmp_path, capsys, flags, message):
    code = main(["--quiet", "attack", *flags, "--n-train", "40", "--n-eval", "10",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err


def test_train_ssl_on_files_runs_the_training_time_attack_and_labels_it(tmp_path, capsys,
                                                                         monkeypatch):
    data = tmp_path / "attack"
    assert main(["--quiet", "attack", "--attack", "corruptencoder", "--n-train", "120",
                 "--n-eval", "10", "--rate", "0.05", "--targets", "0,2",
                 "--out", str(data)]) == 0
    clean = read_file_list(data / "train_clean.txt")
    holds = {t: [p for p, label in zip(clean.paths, clean.labels, strict=True) if label == t][:2]
             for t in (0, 2)}
    common = ["--quiet", "train-ssl", "--file-list", str(data / "train.txt"), "--arch",
              "smallconv4", "--epochs", "1", "--batch-size", "32"]
    plain, attacked = tmp_path / "plain", tmp_path / "attacked"
    assert main([*common, "--out", str(plain)]) == 0
    references = [f"--bad-reference={t}:{p}" for t, paths in holds.items() for p in paths]
    assert main([*common, "--training-attack", "badencoder", "--attack-spec",
                 str(data / "attack.json"), *references, "--badencoder-steps", "3",
                 "--out", str(attacked)]) == 0
    record = json.loads((attacked / "train_ssl.json").read_text())["training_attack"]
    assert record["method"] == "badencoder" and "training-time attack" in record["label"]
    assert record["targets"] == [0, 2] and record["references"] == {"0": 2, "2": 2}
    assert json.loads((plain / "train_ssl.json").read_text())["training_attack"] == {
        "method": "none"}
    before = torch.load(plain / "encoder.pt", weights_only=True)
    after = torch.load(attacked / "encoder.pt", weights_only=True)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the same run, implanted
    # interrupted in the attack: the rerun starts from the trained weights, not from scratch
    import fastbd.attacks.badencoder as badencoder_module
    import fastbd.training.ssl as ssl_module

    resumed, finetune = tmp_path / "resumed", badencoder_module.badencoder_finetune_targets

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    attack_flags = ["--training-attack", "badencoder", "--attack-spec",
                    str(data / "attack.json"), *references, "--badencoder-steps", "3"]
    monkeypatch.setattr(badencoder_module, "badencoder_finetune_targets", interrupted)
    assert main([*common, *attack_flags, "--out", str(resumed)]) == 130
    assert (resumed / "trained_before_attack.pt").is_file()
    monkeypatch.setattr(badencoder_module, "badencoder_finetune_targets", finetune)
    monkeypatch.setattr(ssl_module, "train_ssl", interrupted)  # must not train again
    assert main([*common, *attack_flags, "--out", str(resumed)]) == 0
    again = torch.load(resumed / "encoder.pt", weights_only=True)
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert not (resumed / "trained_before_attack.pt").exists()
    monkeypatch.undo()
    capsys.readouterr()
    for flags, message in (
            (["--training-attack", "badencoder", *references], "needs --attack-spec"),
            (["--training-attack", "badencoder", "--attack-spec", str(data / "attack.json"),
              f"--bad-reference={holds[0][0]}"], "TARGET:PATH"),
            (["--training-attack", "badencoder", "--attack-spec", str(data / "attack.json"),
              f"--bad-reference=0:{holds[0][0]}"], "no --bad-reference for target(s) [2]"),
            ([f"--bad-reference=0:{holds[0][0]}"], "add --training-attack badencoder")):
        assert main([*common, *flags, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    # the synthetic world has no training-time attack flag: refused, not ignored
    assert main(["--quiet", "train-ssl", "--n-train", "20", "--n-eval", "4",
                 "--training-attack", "badencoder", "--out", str(tmp_path / "world")]) == 2
    assert "--training-attack and --bad-reference need --file-list" in capsys.readouterr().err

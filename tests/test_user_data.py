"""The papers' loops on the user's own files through the CLI: training on a file list, an
ImageFolder or a CSV, evaluating on them, the detectors' ``filtered.txt`` read back, resume,
preprocessing that follows the model, and no copy of the images left behind."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastbd.cli import main

TINY_WORLD = ["--n-train", "160", "--n-eval", "40"]


def _run(*flags: str) -> None:
    assert main(["--quiet", *flags]) == 0


@pytest.fixture(scope="module")
def htba_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("htba")
    _run("attack", "--attack", "htba", *TINY_WORLD, "--out", str(out))
    return out


@pytest.fixture(scope="module")
def badnet_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("badnet")
    _run("attack", "--attack", "badnet", *TINY_WORLD, "--rate", "0.05", "--out", str(out))
    return out


def test_world_export_has_a_clean_validation_split_and_class_names(htba_files, badnet_files):
    from fastbd.data.readers import read_csv_pairs, read_file_list
    from fastbd.world import SSLThreatConfig
    from fastbd.world.synthetic import WorldConfig, make_world

    val = read_file_list(htba_files / "val.txt")
    world = make_world(replace(SSLThreatConfig().world, n_train=160, n_eval=40))
    assert val.labels == world.eval.labels.tolist()
    assert not any("HTBA_trigger" in str(p) for p in val.paths)
    clean = read_file_list(htba_files / "train_clean.txt")  # what a linear probe learns from
    assert clean.labels == world.train.labels.tolist()
    assert not any("HTBA_trigger" in str(p) for p in clean.paths)
    pairs = read_csv_pairs(badnet_files / "val.csv")
    clip_world = make_world(replace(WorldConfig(), n_train=160, n_eval=40))
    assert pairs.captions == clip_world.eval.captions
    assert set(pairs.columns["is_backdoor"]) == {"0"}
    names = (badnet_files / "classes.txt").read_text().splitlines()
    assert names == clip_world.class_names


def test_ssl_loop_on_files_trains_detects_retrains_and_evaluates(htba_files, tmp_path):
    from fastbd.attacks import make_attack
    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import read_file_list
    from fastbd.eval.probe import ProbeConfig, linear_probe
    from fastbd.models import encoder_by_name

    train = ["--arch", "smallconv4", "--epochs", "2", "--batch-size", "64"]
    _run("train-ssl", "--file-list", str(htba_files / "train.txt"), *train, "--method", "byol",
         "--out", str(tmp_path / "ssl"))
    assert sorted(p.name for p in (tmp_path / "ssl").iterdir()) == [
        "encoder.pt", "manifest.json", "train_ssl.json"]  # no image cache, no training state
    summary = json.loads((tmp_path / "ssl" / "train_ssl.json").read_text())
    assert summary["images"] == 160 and summary["config"]["method"] == "byol"
    checkpoint = tmp_path / "ssl" / "encoder.pt"
    assert set(torch.load(checkpoint, weights_only=True)) == set(
        encoder_by_name("smallconv4").backbone.state_dict())  # the backbone's own keys

    _run("poisoncam", "--file-list", str(htba_files / "train.txt"), "--arch", "smallconv4",
         "--checkpoint", str(checkpoint), "--out", str(tmp_path / "det"))
    assert not (tmp_path / "det" / "bank.npy").exists()
    filtered = read_file_list(tmp_path / "det" / "filtered.txt")
    removed = int(json.loads((tmp_path / "det" / "result.json").read_text())["removed"])
    assert len(filtered.paths) == 160 - removed and all(p.is_file() for p in filtered.paths)
    _run("train-ssl", "--file-list", str(tmp_path / "det" / "filtered.txt"), *train,
         "--out", str(tmp_path / "retrained"))
    retrained = json.loads((tmp_path / "retrained" / "train_ssl.json").read_text())
    assert retrained["images"] == 160 - removed

    _run("eval", "ssl", "--arch", "smallconv4", "--checkpoint", str(checkpoint), "--train-list",
         str(htba_files / "train.txt"), "--val-list", str(htba_files / "val.txt"), "--attack",
         "htba", "--target", "0", "--out", str(tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # The oracle: the probe on the same files read by hand.
    encoder = encoder_by_name("smallconv4", checkpoint)

    def read(name):
        listing = read_file_list(htba_files / name)
        bank, _ = ImageBank.from_files(listing.paths, 32, crop_ratio=1.0, verbose=False)
        return bank.images, torch.tensor(listing.labels)

    # on the user's lists the probe learns from the papers' 1 %, stratified
    expected = linear_probe(encoder, *read("train.txt"), *read("val.txt"),
                            make_attack("htba", 32), 0,
                            ProbeConfig(labelled_fraction=0.01)).to_dict()
    assert {k: result[k] for k in expected} == expected and result["labelled_fraction"] == 0.01
    assert result["attack"] == "htba" and result["non_target_images"] > 0


def test_train_ssl_records_the_probe_per_epoch_as_the_papers_table_iii(htba_files, tmp_path,
                                                                       capsys):
    flags = ["train-ssl", "--file-list", str(htba_files / "train.txt"), "--arch", "smallconv4",
             "--epochs", "2", "--batch-size", "64"]
    _run(*flags, "--eval-every", "1", "--probe-list", str(htba_files / "train_clean.txt"),
         "--val-list", str(htba_files / "val.txt"), "--attack-spec",
         str(htba_files / "attack.json"), "--out", str(tmp_path / "ssl"))
    record = json.loads((tmp_path / "ssl" / "train_ssl.json").read_text())
    per_epoch = record["per_epoch"]
    assert [row["epoch"] for row in per_epoch] == [1, 2]
    for row in per_epoch:
        assert 0 <= row["clean_accuracy"] <= 1 and row["patched_false_positives"] >= 0
    assert main(["--quiet", *flags, "--eval-every", "1", "--out", str(tmp_path / "no")]) == 2
    assert "--eval-every needs --probe-list and --val-list" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()  # refused before any work


@pytest.mark.parametrize("command, module, function, nth, weights, cache", [
    # two views × two steps per epoch: the 9th augment call is the first view of epoch 3
    (["train-ssl", "--file-list", "{htba}/train.txt", "--arch", "smallconv4", "--epochs", "3",
      "--batch-size", "64", "--method", "mocov3"], "fastbd.training.ssl", "augment", 9,
     "encoder.pt", "bank.npy"),
    # two steps per epoch: the 5th loss is the first step of epoch 3
    (["train-clip", "--csv", "{badnet}/train.csv", "--epochs", "3", "--batch-size", "64"],
     "fastbd.training.clip", "clip_loss", 5, "clip.pt", "pairs.npy"),
], ids=["train-ssl", "train-clip"])
def test_interrupted_training_on_files_resumes_to_the_uninterrupted_weights(
        htba_files, badnet_files, tmp_path, monkeypatch, command, module, function, nth,
        weights, cache):
    import importlib

    trainer = importlib.import_module(module)
    flags = [f.format(htba=htba_files, badnet=badnet_files) for f in command]
    _run(*flags, "--out", str(tmp_path / "whole"))
    calls = []
    real = getattr(trainer, function)

    def interrupt_in_epoch_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, function, interrupt_in_epoch_three)
    out = tmp_path / "cut"
    assert main(["--quiet", *flags, "--out", str(out)]) == 130
    assert (out / "train_state.pt").is_file() and (out / cache).is_file()
    assert not (out / weights).exists()
    monkeypatch.setattr(trainer, function, real)
    _run(*flags, "--out", str(out))
    whole = torch.load(tmp_path / "whole" / weights, weights_only=True)
    resumed = torch.load(out / weights, weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (out / "train_state.pt").exists() and not (out / cache).exists()


def _image_folder(root: Path, classes: int = 2, per_class: int = 6, size: int = 40) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i}.png")
    return root


def test_train_ssl_trains_a_timm_backbone_on_an_image_folder_that_the_detector_reads(tmp_path):
    from fastbd.models import encoder_by_name

    folder = _image_folder(tmp_path / "images")
    _run("train-ssl", "--image-folder", str(folder), "--arch", "test_vit", "--image-size", "32",
         "--epochs", "1", "--batch-size", "6", "--out", str(tmp_path / "vit"))
    summary = json.loads((tmp_path / "vit" / "train_ssl.json").read_text())
    assert summary["arch"] == "test_vit" and summary["image_size"] == 32
    state = torch.load(tmp_path / "vit" / "encoder.pt", weights_only=True)
    encoder = encoder_by_name("test_vit", tmp_path / "vit" / "encoder.pt", 32)
    assert all(torch.equal(v, state[k]) for k, v in encoder.backbone.state_dict().items())


def test_timm_encoders_take_preprocessing_from_their_pretrained_config():
    import timm

    from fastbd.models import default_image_size, encoder_by_name

    for arch in ("test_vit", "resnet18"):
        cfg = timm.get_pretrained_cfg(arch)
        encoder = encoder_by_name(arch)
        assert encoder.image_size == default_image_size(arch) == cfg.input_size[-1]
        assert encoder.mean == tuple(cfg.mean) and encoder.std == tuple(cfg.std)
        assert encoder.crop_ratio == cfg.crop_pct
    assert encoder_by_name("smallconv8").crop_ratio == 1.0


def test_clip_loop_on_a_csv_at_another_image_size(badnet_files, tmp_path):
    from fastbd.models.clip import clip_image_size, load_clip

    _run("train-clip", "--csv", str(badnet_files / "train.csv"), "--image-size", "64",
         "--epochs", "1", "--out", str(tmp_path / "clip"))
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == [
        "clip.pt", "manifest.json", "train_clip.json"]
    checkpoint = tmp_path / "clip" / "clip.pt"
    assert clip_image_size(load_clip("tiny", checkpoint)) == 64  # read back at its size
    _run("eval", "clip", "--checkpoint", str(checkpoint), "--eval-csv",
         str(badnet_files / "val.csv"), "--class-names", str(badnet_files / "classes.txt"),
         "--attack", "badnet", "--out", str(tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["images"] == 40 and 0 <= result["asr"] <= 1
    assert set(result["retrieval"]) >= {"image_to_text_R@1", "text_to_image_R@10"}
    _run("ubt", "--csv", str(badnet_files / "train.csv"), "--checkpoint", str(checkpoint),
         "--reference-checkpoint", str(checkpoint), "--out", str(tmp_path / "ubt"))
    assert not (tmp_path / "ubt" / "pairs.npy").exists()
    assert (tmp_path / "ubt" / "result.json").is_file()


def test_train_clip_fine_tunes_given_weights_as_the_ubt_papers_threat_model(badnet_files,
                                                                            tmp_path, capsys):
    from fastbd.models.clip import TinyCLIPConfig, load_clip, tiny_clip

    start = tiny_clip(TinyCLIPConfig(), seed=11).eval()
    torch.save(start.state_dict(), tmp_path / "pretrained.pt")
    _run("train-clip", "--csv", str(badnet_files / "train.csv"), "--init-checkpoint",
         str(tmp_path / "pretrained.pt"), "--epochs", "1", "--lr", "1e-9",
         "--out", str(tmp_path / "tuned"))
    record = json.loads((tmp_path / "tuned" / "train_clip.json").read_text())
    assert record["initialised_from"] == str(tmp_path / "pretrained.pt")
    tuned = load_clip("tiny", tmp_path / "tuned" / "clip.pt")
    # a step at lr 1e-9 leaves the given weights (a fresh start would be another model;
    # BatchNorm's running statistics do move)
    tuned_parameters = dict(tuned.named_parameters())
    for name, a in start.named_parameters():
        torch.testing.assert_close(a, tuned_parameters[name], atol=1e-5, rtol=0, msg=name)
    fresh = dict(tiny_clip(TinyCLIPConfig(), seed=0).named_parameters())
    assert not torch.allclose(fresh["visual.conv1.weight"], tuned_parameters["visual.conv1.weight"])
    assert main(["--quiet", "train-clip", "--init-checkpoint", str(tmp_path / "pretrained.pt"),
                 "--out", str(tmp_path / "world")]) == 2
    assert "--init-checkpoint and --pretrained need --csv" in capsys.readouterr().err


def test_open_clip_pretrained_weights_that_cannot_be_had_are_named():
    from fastbd.models.clip import load_clip

    with pytest.raises(ValueError, match="cannot load open_clip's 'RN50' weights 'no-such-tag'"):
        load_clip("RN50", None, pretrained="no-such-tag")
    with pytest.raises(ValueError, match="tiny CLIP has no open_clip pretrained"):
        load_clip("tiny", None, pretrained="openai")
    with pytest.raises(ValueError, match="give one of"):
        load_clip("RN50", "weights.pt", pretrained="openai")


def test_eval_clip_on_the_exported_world_equals_the_world_evaluation(badnet_files, tmp_path):
    from fastbd.eval.zeroshot import evaluate_zero_shot
    from fastbd.models.clip import TinyCLIPConfig, clip_tokenizer, tiny_clip
    from fastbd.world import world_attack
    from fastbd.world.synthetic import ZERO_SHOT_TEMPLATES, WorldConfig, make_world

    model = tiny_clip(TinyCLIPConfig(), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    spec = json.loads((badnet_files / "attack.json").read_text())["trigger"]
    assert spec == {"attack": "badnet", "seed": 0, "options": {"side_fraction": 0.3}}
    _run("eval", "clip", "--checkpoint", str(tmp_path / "clip.pt"), "--eval-csv",
         str(badnet_files / "val.csv"), "--class-names", str(badnet_files / "classes.txt"),
         "--templates", str(templates), "--attack-spec", str(badnet_files / "attack.json"),
         "--out", str(tmp_path / "eval"))
    from_files = json.loads((tmp_path / "eval" / "eval.json").read_text())
    world = make_world(replace(WorldConfig(), n_train=160, n_eval=40))
    expected = evaluate_zero_shot(model, clip_tokenizer(), world.eval.images, world.eval.labels,
                                  world.class_names, ZERO_SHOT_TEMPLATES,
                                  world_attack("badnet", 32), 0)
    for key in ("clean_accuracy", "patched_accuracy", "asr"):
        assert from_files[key] == getattr(expected, key)
    assert 0.0 <= from_files["retrieval_asr"] <= 1.0  # val.csv has captions
    # KL to a "retrained" model: 0 against itself, positive against another model
    other = tiny_clip(TinyCLIPConfig(), seed=4).eval()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    kl = {}
    for name in ("clip", "other"):
        _run("eval", "clip", "--checkpoint", str(tmp_path / "clip.pt"), "--eval-csv",
             str(badnet_files / "val.csv"), "--class-names", str(badnet_files / "classes.txt"),
             "--templates", str(templates), "--retrained-checkpoint",
             str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / f"kl-{name}"))
        kl[name] = json.loads((tmp_path / f"kl-{name}" / "eval.json").read_text())[
            "kl_to_retrained"]
    assert kl["clip"] == pytest.approx(0.0, abs=1e-9) and kl["other"] > 1e-6


def test_eval_clip_scores_a_users_own_triggered_images_and_needs_no_captions(badnet_files,
                                                                          tmp_path, capsys):
    """``--triggered-csv``: images that already carry the trigger are scored as they are — the
    same ASR as triggering the clean images with that trigger; a CSV without captions gives
    zero-shot accuracy (retrieval null)."""
    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import read_csv_pairs, save_png
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip
    from fastbd.world import world_attack

    torch.save(tiny_clip(TinyCLIPConfig(), seed=3).state_dict(), tmp_path / "clip.pt")
    val = read_csv_pairs(badnet_files / "val.csv")
    images = ImageBank.from_files(val.paths, 32, crop_ratio=1.0, verbose=False)[0].images
    triggered, _ = world_attack("badnet", 32).apply(torch.as_tensor(images),
                                                   torch.Generator().manual_seed(1), train=False)
    rows = ["image,label"]
    for i, (image, label) in enumerate(zip(triggered, val.columns["label"], strict=True)):
        save_png(image, tmp_path / f"t{i}.png")
        rows.append(f"t{i}.png,{label}")
    (tmp_path / "triggered.csv").write_text("\n".join(rows) + "\n")
    no_captions = tmp_path / "val-no-captions.csv"
    no_captions.write_text("\n".join(["image,label"] + [
        f"{path},{label}" for path, label in zip(val.paths, val.columns["label"], strict=True)
    ]) + "\n")
    common = ["eval", "clip", "--checkpoint", str(tmp_path / "clip.pt"), "--class-names",
              str(badnet_files / "classes.txt"), "--seed", "0"]
    _run(*common, "--eval-csv", str(badnet_files / "val.csv"), "--attack-spec",
         str(badnet_files / "attack.json"), "--out", str(tmp_path / "applied"))
    _run(*common, "--eval-csv", str(no_captions), "--triggered-csv",
         str(tmp_path / "triggered.csv"), "--out", str(tmp_path / "given"))
    applied = json.loads((tmp_path / "applied" / "eval.json").read_text())
    given = json.loads((tmp_path / "given" / "eval.json").read_text())
    for key in ("clean_accuracy", "patched_accuracy", "asr"):
        assert given[key] == applied[key]
    assert given["attack"] == "triggered-csv:triggered.csv" and given["retrieval"] is None
    assert applied["retrieval"] is not None
    capsys.readouterr()
    assert main(["--quiet", *common, "--eval-csv", str(no_captions), "--triggered-csv",
                 str(tmp_path / "triggered.csv"), "--attack", "badnet", "--out",
                 str(tmp_path / "both")]) == 2
    assert "would trigger them again" in capsys.readouterr().err


def test_a_missing_csv_column_is_named_with_its_flag(badnet_files, tmp_path, capsys):
    assert main(["--quiet", "train-clip", "--csv", str(badnet_files / "train.csv"),
                 "--caption-key", "text", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no column 'text'" in error and "--caption-key" in error


def test_the_attack_spec_rebuilds_the_planted_trigger_not_the_published_one(badnet_files):
    from argparse import Namespace

    from fastbd.cli.train import eval_trigger
    from fastbd.world import world_attack

    flags = dict(trigger=None, trigger_side=None, seed=0, attack="badnet")
    planted = eval_trigger(Namespace(attack_spec=str(badnet_files / "attack.json"), **flags),
                           32, "badnet")
    published = eval_trigger(Namespace(attack_spec=None, **flags), 32, "badnet")
    assert planted.side == world_attack("badnet", 32).side == 10
    assert published.side == 3  # 16/224 of 32 px: not what the world planted


def test_clip_preprocessing_follows_the_model(tmp_path):
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN

    from fastbd.clipdefense.loading import load_pairs
    from fastbd.models.clip import TinyCLIPConfig, clip_normalise, clip_preprocessing, tiny_clip

    tiny = tiny_clip(TinyCLIPConfig())
    assert clip_preprocessing(tiny)[0] == tuple(OPENAI_DATASET_MEAN)
    other = open_clip.create_model("RN50", pretrained=None, force_image_size=64,
                                   force_preprocess_cfg={"mean": (0.5,) * 3, "std": (0.25,) * 3})
    assert clip_preprocessing(other) == ((0.5,) * 3, (0.25,) * 3)
    grey = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(clip_normalise(grey, other), torch.full((1, 3, 4, 4), 2.0))
    # CLIP reads files resized, not cropped: a 5-px patch in the corner of a 32-px image stays.
    image = torch.zeros(32, 32, 3, dtype=torch.uint8)
    image[:5, :5] = 255
    Image.fromarray(image.numpy()).save(tmp_path / "corner.png")
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], ["corner.png", "a corner"],
                                      ["corner.png", "again"]])
    for model, side in ((tiny, 32), (other, 64)):
        pairs = load_pairs(tmp_path / "pairs.csv", model, verbose=False)
        assert pairs.images.shape[-1] == side
        corner = side * 4 // 32  # the patch inside its resampled edge
        assert (pairs.images[0, :, :corner, :corner] > 200).all()
        assert pairs.labels is None


def test_poisoned_captions_on_real_class_names_name_the_whole_class(tmp_path):
    folder = _image_folder(tmp_path / "images", classes=2, per_class=10, size=24)
    rows = [["image", "caption", "label"]]
    for c in range(2):
        rows += [[f"images/class{c}/{i}.png", f"a photo number {i}", c] for i in range(10)]
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert folder.is_dir()
    _run("attack", "--attack", "badnet", "--csv", str(tmp_path / "pairs.csv"), "--image-size",
         "24", "--rate", "0.3", "--target", "1", "--class-names", "tabby cat,golden retriever",
         "--out", str(tmp_path / "out"))
    with open(tmp_path / "out" / "train.csv", newline="") as handle:
        poisoned = [r for r in csv.DictReader(handle) if r["is_backdoor"] == "1"]
    assert len(poisoned) == 6
    assert all("golden retriever" in r["caption"] for r in poisoned)


@pytest.mark.parametrize("flags, message", [
    (["eval", "clip", "--checkpoint", "{clip}", "--eval-csv", "{csv}"], "needs --class-names"),
    (["eval", "clip", "--checkpoint", "{clip}", "--eval-csv", "{csv}", "--class-names", "a,b",
      "--templates", "{bad_templates}"], "needs a {} for the class name"),
    (["eval", "ssl", "--checkpoint", "{clip}", "--train-list", "{list}"], "give both"),
    (["train-ssl", "--arch", "resnet18"], "--arch needs --file-list"),
    (["train-ssl", "--file-list", "{list}", "--image-folder", "{dir}"], "exactly one of"),
    (["eval", "clip", "--checkpoint", "{clip}", "--class-names", "a,b"], "need --eval-csv"),
], ids=["no-class-names", "template-without-slot", "train-list-alone", "arch-on-world",
        "two-sources", "class-names-on-world"])
def test_user_data_commands_refuse_bad_input(tmp_path, capsys, badnet_files, flags, message):
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    torch.save(tiny_clip(TinyCLIPConfig()).state_dict(), tmp_path / "clip.pt")
    (tmp_path / "bad.txt").write_text("a photo of a thing\n")
    values = {"clip": str(tmp_path / "clip.pt"), "csv": str(badnet_files / "val.csv"),
              "bad_templates": str(tmp_path / "bad.txt"), "list": str(badnet_files / "val.txt"),
              "dir": str(tmp_path)}
    argv = [f.format(**values) if f.startswith("{") else f for f in flags]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_loop_ssl_runs_the_papers_loop_and_a_rerun_skips_finished_steps(tmp_path, capsys):
    out = tmp_path / "loop"
    flags = ["loop", "ssl", *TINY_WORLD, "--arch", "smallconv4", "--epochs", "1",
             "--batch-size", "64", "--out", str(out)]
    bad = tmp_path / "bad.json"
    bad.write_text('{"no_such_field": 1}')
    assert main(["--quiet", *flags, "--detector-config", str(bad)]) == 2  # fails at detection
    assert "rerun the same command to continue" in capsys.readouterr().err
    finished = json.loads((out / "loop_steps.json").read_text())
    assert list(finished) == ["data", "train-poisoned", "eval-poisoned"]
    before = _mtimes(out / "train-poisoned")
    _run(*flags)
    assert _mtimes(out / "train-poisoned") == before  # trained once
    rows = json.loads((out / "loop.json").read_text())["rows"]
    assert set(rows) == {"poisoned", "poisoncam"}
    row = rows["poisoncam"]
    assert row["recall"] is not None
    if row["backdoor"] is False:  # a 1-epoch encoder of 160 images may learn no backdoor
        assert row["removed"] == 0 and "no backdoor found" in (out / "loop.md").read_text()
    else:
        assert row["removed"] > 0
    assert rows["poisoned"]["non_target_images"] == rows["poisoncam"]["non_target_images"]
    assert "| poisoncam |" in (out / "loop.md").read_text()
    retrained = json.loads((out / "train-poisoncam" / "train_ssl.json").read_text())
    assert retrained["images"] == 160 - rows["poisoncam"]["removed"]
    finished = _mtimes(out)
    _run(*flags)
    assert {k: v for k, v in _mtimes(out).items() if "loop." not in k and "manifest" not in k} \
        == {k: v for k, v in finished.items() if "loop." not in k and "manifest" not in k}
    before = _mtimes(out / "data")
    _run(*flags[:-2], "--epochs", "2", *flags[-2:])  # another recipe: retrain, then redo after
    assert _mtimes(out / "data") == before  # the export is unchanged and kept
    assert json.loads((out / "train-poisoned" / "train_ssl.json").read_text())[
        "config"]["epochs"] == 2
    assert json.loads((out / "train-poisoncam" / "train_ssl.json").read_text())[
        "config"]["epochs"] == 2  # the steps after it ran again on the new encoder


def test_loop_over_seeds_reports_mean_and_std(tmp_path, monkeypatch, capsys):
    import fastbd.cli.loop as loop_module

    runs = []

    def fake_ssl_loop(args, steps):  # each seed's rows, as the real loop returns them
        runs.append((args.seed, steps.out))
        return {"poisoned": {"clean_accuracy": 0.80 + 0.01 * args.seed, "asr": 0.5,
                             "removed": 0},
                "poisoncam": {"clean_accuracy": 0.79, "asr": 0.01 * args.seed,
                              "removed": 10 * args.seed}}

    monkeypatch.setattr(loop_module, "ssl_loop", fake_ssl_loop)
    assert main(["--quiet", "loop", "ssl", "--seeds", "0,1,2", "--out", str(tmp_path)]) == 0
    assert runs == [(s, tmp_path / f"seed{s}") for s in (0, 1, 2)]
    saved = json.loads((tmp_path / "loop.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and set(saved["per_seed"]) == {"0", "1", "2"}
    row = saved["rows"]["poisoncam"]
    assert row["seeds"] == 3 and row["removed"] == pytest.approx(10.0)
    assert row["removed_std"] == pytest.approx(10.0)  # sample std of 0, 10, 20
    assert row["asr"] == pytest.approx(0.01) and row["clean_accuracy_std"] == 0.0
    assert "| poisoncam (3 seeds) | 79.0 ± 0.0 | 1.0 ± 1.0 | 10 ± 10 |" in capsys.readouterr().out
    assert main(["--quiet", "loop", "ssl", "--seeds", "1,1", "--out", str(tmp_path)]) == 2


def test_loop_clip_defends_and_compares(tmp_path):
    out = tmp_path / "loop"
    _run("loop", "clip", *TINY_WORLD, "--rate", "0.05", "--epochs", "1", "--defenses",
         "ubt,cleanclip", "--out", str(out))
    rows = json.loads((out / "loop.json").read_text())["rows"]
    assert set(rows) == {"poisoned", "ubt", "cleanclip"}
    assert rows["ubt"]["suspicious"] > 0 and rows["ubt"]["retrieval"] is not None
    # the reference and CleanCLIP learn from a disjoint world of the same look, never from the
    # training pairs minus the poison (ground truth)
    assert not (out / "data" / "clean.csv").exists()

    def image_bytes(folder):
        with open(folder / ("clean.csv" if folder.name == "reference-data" else "train.csv"),
                  newline="") as handle:
            return {(folder / row["image"]).read_bytes() for row in csv.DictReader(handle)}

    reference_images = image_bytes(out / "reference-data")
    assert len(reference_images) > 100
    assert not reference_images & image_bytes(out / "data")
    assert (out / "train-clean" / "clip.pt").is_file()


@pytest.mark.parametrize("flags, message", [
    (["loop", "ssl", "--file-list", "{list}"], "--probe-list"),
    (["loop", "clip", "--csv", "{csv}"], "--eval-csv and --class-names"),
    (["loop", "ssl", "--detectors", "poisoncam,nope"], "expected names among"),
    (["loop", "clip", "--csv", "{csv}", "--eval-csv", "{csv}", "--class-names", "a,b"],
     "--reference-checkpoint"),
], ids=["ssl-no-probe-list", "clip-no-eval-csv", "unknown-detector", "clip-no-reference"])
def test_loop_refuses_incomplete_input(tmp_path, capsys, badnet_files, flags, message):
    values = {"list": str(badnet_files / "val.txt"), "csv": str(badnet_files / "val.csv")}
    argv = [f.format(**values) if f.startswith("{") else f for f in flags]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err

"""Every bad input gives a clear error, nothing planted in an output folder runs or redirects a
write, nothing is lost or left stale.

The CLI's contract: exit 2 and one line on stderr naming the file (and line) for unusable input,
130 on Ctrl-C and 143 on SIGTERM with a line saying how to continue.
"""

import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbd.baselines import ABLConfig, CleanCLIPConfig
from fastbd.cli import main
from fastbd.data.bank import ImageBank, ImageReadError, load_image
from fastbd.data.readers import read_csv_pairs, read_file_list
from fastbd.ops import mask_fill
from fastbd.poisoncam import ClassifierConfig, Config
from fastbd.storage import (
    MANIFEST,
    ResultFiles,
    atomic_output,
    check_writable_dir,
    load_torch,
    remove_result,
)
from fastbd.ubt import Config as UBTConfig

SMALL_DETECTOR = {"n_clusters": 3, "n_masks": 4, "test_set_size": 10, "topk_poisons": 5,
                  "batch_size": 64, "classifier": {"n_models": 1, "iterations": 20, "width": 4,
                                                   "val_every": 10, "patience": 2}}


class Payload:
    """Unpickling this runs ``open(path, "w")``: proof that a load executed code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "60", "--n-eval", "4",
                 "--out", str(root / "src")]) == 0
    (root / "config.json").write_text(json.dumps(SMALL_DETECTOR))
    return root


def detect_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "poisoncam", "--file-list", str(world / "src" / "train.txt"), "--arch",
            "smallconv4", "--config", str(world / "config.json"), "--device", "cpu", "--out",
            str(out), *extra]


def one_line_error(capsys, command: str = "poisoncam") -> str:
    error = capsys.readouterr().err
    assert error.startswith(f"fastbd {command}: error: "), error
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("FASTBD_DEBUG", raising=False)


# --- security: planted pickles and links ---------------------------------------------------

@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_planted_search_state_is_refused_and_never_run(world, tmp_path, capsys, resume):
    out, proof = tmp_path / "out", tmp_path / "payload-ran"
    out.mkdir()
    torch.save({"scores": Payload(proof)}, out / "search_state.pt")
    assert main(detect_args(world, out, *(["--resume"] if resume else []))) == 2
    error = one_line_error(capsys)
    assert "search_state.pt" in error and "could run code" in error
    assert not proof.exists()


def test_planted_checkpoints_are_refused_and_never_run(world, tmp_path, capsys):
    proof = tmp_path / "payload-ran"
    checkpoint = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(proof)}, checkpoint)
    assert main(detect_args(world, tmp_path / "out", "--checkpoint", str(checkpoint))) == 2
    assert "could run code" in one_line_error(capsys) and not proof.exists()
    state = tmp_path / "training.pt"
    torch.save([Payload(proof)], state)
    with pytest.raises(ValueError, match="could run code"):
        load_torch(state)
    assert not proof.exists()


def test_planted_stage_file_of_a_defense_is_refused(clip_csv, tmp_path, capsys):
    root, csv_path = clip_csv
    out, proof = tmp_path / "out", tmp_path / "payload-ran"
    out.mkdir()
    torch.save({"run": {}, "payload": Payload(proof)}, out / "ubt-split.pt")
    assert main(["--quiet", "ubt", "--csv", str(csv_path), "--checkpoint", str(root / "m.pt"),
                 "--reference-checkpoint", str(root / "m.pt"), "--config",
                 str(root / "ubt.json"), "--device", "cpu", "--out", str(out)]) == 2
    assert "ubt-split.pt" in one_line_error(capsys, "ubt") and not proof.exists()


def test_writes_never_follow_a_link_out_of_the_output_folder(world, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").symlink_to(victim)
    (out / "scores.npy").symlink_to(outside / "planted.npy")  # a dangling link
    assert main(detect_args(world, out)) == 0
    assert victim.read_text() == "keep me" and not (outside / "planted.npy").exists()
    assert not (out / "result.json").is_symlink() and json.loads((out / "result.json").read_text())
    attack_out = tmp_path / "attack"
    attack_out.mkdir()
    (attack_out / "train").symlink_to(outside, target_is_directory=True)
    assert main(["--quiet", "attack", "--n-train", "20", "--n-eval", "2", "--out",
                 str(attack_out)]) == 2
    assert "is a symbolic link" in one_line_error(capsys, "attack")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


# --- images -----------------------------------------------------------------------------------

def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    samples = np.full((40, 40), 32896, dtype=np.uint16)  # 128 · 257: mid grey
    samples[:, :20] = 65535
    path = tmp_path / "grey16.png"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, 40, crop_ratio=1.0)
    assert image.dtype == torch.uint8
    assert torch.equal(image[:, :, :20], torch.full((3, 40, 20), 255, dtype=torch.uint8))
    assert torch.equal(image[:, :, 20:], torch.full((3, 40, 20), 128, dtype=torch.uint8))


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_image(path, 8, crop_ratio=1.0)
    assert torch.equal(image[:, :, :4], torch.full((3, 8, 4), 255, dtype=torch.uint8))
    assert image[:, :, 4:].tolist() == torch.tensor([200, 0, 0]).view(3, 1, 1).expand(
        3, 8, 4).tolist()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_unreadable_images(tmp_path, monkeypatch, capsys):
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² > 2 · 1000: refused by PIL
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    with pytest.raises(ImageReadError, match="too large to decode safely") as error:
        ImageBank.from_files(paths, 16, verbose=False)
    assert error.value.path == str(paths[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    Image.new("RGB", (70, 70)).save(paths[1])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2100)  # only the 70² image is refused
    bank, report = ImageBank.from_files(paths, 16, skip_bad=True, verbose=False)
    assert report.kept == [0, 2] and report.skipped[0][0] == str(paths[1])
    assert len(bank) == 2


def test_a_byte_order_mark_in_a_csv_header_is_accepted(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_bytes("image,caption\na.png,a cat\n".encode("utf-8-sig"))
    pairs = read_csv_pairs(tmp_path / "pairs.csv")
    assert pairs.captions == ["a cat"] and pairs.paths == [tmp_path / "a.png"]


# --- the exit contract ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "list", "tensor", "folder",
                                  "no-tensors"])
def test_unusable_checkpoints_exit_2_naming_the_file(world, tmp_path, capsys, kind):
    checkpoint = tmp_path / "encoder.pt"
    if kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    elif kind == "empty":
        checkpoint.write_bytes(b"")
    elif kind == "text":
        checkpoint.write_text("not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], checkpoint)
    elif kind == "tensor":
        torch.save(torch.zeros(3), checkpoint)
    elif kind == "folder":
        checkpoint.mkdir()
    else:
        torch.save({"epoch": 3, "arch": "resnet"}, checkpoint)
    assert main(detect_args(world, tmp_path / "out", "--checkpoint", str(checkpoint))) == 2
    assert str(checkpoint) in one_line_error(capsys)


def test_unusable_config_files_exit_2_naming_the_file(world, tmp_path, capsys):
    folder = tmp_path / "config.json"
    folder.mkdir()
    args = detect_args(world, tmp_path / "out")
    at = args.index("--config") + 1
    args[at] = str(folder)
    assert main(args) == 2
    assert f"config {folder} is a folder" in one_line_error(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "n_masks": 3,\n  "window": }\n')
    args[at] = str(bad)
    assert main(args) == 2
    assert f"{bad}:3: not valid JSON" in one_line_error(capsys)
    bad.write_bytes(b'{"n_masks": 3}\n\xff\xfe')
    assert main(args) == 2
    assert f"{bad}:2: config is not UTF-8" in one_line_error(capsys)


@pytest.mark.parametrize("text,message", [
    ('{"n_masks": "8"}', "n_masks must be an integer, got '8' (str)"),
    ('{"fill": NaN}', "fill must be a finite number, got nan"),
    ('{"seed": 1.5}', "seed must be an integer, got 1.5 (float)"),
    ('{"n_masks": -4}', "n_masks must be ≥ 1, got -4"),
    ('{"window": 0}', "window must be ≥ 1, got 0"),
    ('{"n_clusters": 0}', "n_clusters must be ≥ 2, got 0"),
    ('{"prune_fraction": 1.5}', "prune_fraction must be in [0, 1), got 1.5"),
    ('{"window": 2.5}', "window must be an integer, got 2.5 (float)"),
    ('{"classifier": {"width": 0}}', "in section 'classifier': width must be ≥ 1, got 0"),
    ('{"classifier": {"lr": -1}}', "in section 'classifier': lr must be > 0"),
    ('{"classifier": {"paste_size": [80, 20]}}', "paste_size must be (lo, hi)"),
    ('{"mask_strategy": "circles"}', "mask_strategy must be one of full, interval, random"),
])
def test_config_values_are_checked_when_built(world, tmp_path, capsys, text, message):
    config = tmp_path / "config.json"
    config.write_text(text)
    args = detect_args(world, tmp_path / "out")
    args[args.index("--config") + 1] = str(config)
    assert main(args) == 2
    error = one_line_error(capsys)
    assert str(config) in error and message in error
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("cls,field,value,message", [
    (Config, "n_masks", "8", "n_masks must be an integer"),
    (Config, "fill", math.nan, "fill must be a finite number"),
    (Config, "seed", 1.5, "seed must be an integer"),
    (Config, "n_masks", True, "n_masks must be an integer"),
    (ClassifierConfig, "lr", -0.1, "lr must be > 0"),
    (ClassifierConfig, "threshold", "median", "threshold must be one of otsu, argmax"),
    (UBTConfig, "susp_fraction", 0.0, "susp_fraction must be in (0, 1)"),
    (UBTConfig, "topk", 0, "topk must be ≥ 1"),
    (UBTConfig, "unlearn_lr", math.inf, "unlearn_lr must be a finite number"),
    (UBTConfig, "skip_check", "yes", "skip_check must be true or false"),
    (ABLConfig, "epochs", -1, "epochs must be ≥ 0"),
    (CleanCLIPConfig, "token_drop", 1.0, "token_drop must be in [0, 1)"),
    (CleanCLIPConfig, "augment", {"flip_p": 0.5}, "augment must be a AugmentConfig"),
])
def test_every_defense_config_checks_its_fields(cls, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**{field: value})


def test_config_lists_become_tuples():
    assert Config(classifier=ClassifierConfig(paste_size=[20, 40])).classifier.paste_size == (
        20, 40)


def test_csv_rows_with_missing_or_extra_fields_name_the_line(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,caption,label\na.png,a cat,0\nb.png\n")
    with pytest.raises(ValueError, match=r"pairs.csv:3: row lacks the field\(s\) caption, label"):
        read_csv_pairs(csv_path)
    csv_path.write_text("image,caption\na.png,a cat, sitting\n")
    with pytest.raises(ValueError, match=r"pairs.csv:2: 3 fields, the header has 2"):
        read_csv_pairs(csv_path)


def test_csv_errors_through_the_cli(clip_csv, tmp_path, capsys):
    root, _ = clip_csv
    bad = tmp_path / "pairs.csv"
    bad.write_text("image,caption\nx.png\n")
    assert main(["--quiet", "cleanclip", "--csv", str(bad), "--checkpoint", str(root / "m.pt"),
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert f"{bad}:2: row lacks the field(s) caption" in one_line_error(capsys, "cleanclip")


def test_non_utf8_file_lists_name_the_line(world, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png 0\nb\xe9.png 1\n")
    with pytest.raises(ValueError, match=r"list.txt:2: file list is not UTF-8"):
        read_file_list(listing)
    args = detect_args(world, tmp_path / "out")
    args[args.index("--file-list") + 1] = str(listing)
    assert main(args) == 2
    assert f"{listing}:2: file list is not UTF-8" in one_line_error(capsys)


def test_a_line_break_in_an_image_name_is_refused_naming_the_folder(tmp_path, capsys):
    """filtered.txt holds one path per line: a name with a line break would span two."""
    root = tmp_path / "folder"
    for name in ("0/a.png", "0/b.png", "1/n\nx.png", "1/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (10, 20, 30)).save(root / name)
    assert main(["--quiet", "poisoncam", "--image-folder", str(root), "--arch", "smallconv4",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    error = one_line_error(capsys)
    assert str(root) in error and "line break" in error


def test_a_validation_label_outside_the_probes_classes_names_the_line(world, tmp_path,
                                                                       capsys):
    """One val.txt label past the training list's classes would build a wider probe and score
    those images wrong silently: exit 2, file:line."""
    source = world / "src"
    lines = (source / "val.txt").read_text().splitlines()
    path, _ = lines[1].rsplit(" ", 1)
    lines[1] = f"{path} 57"
    bad = tmp_path / "val.txt"
    bad.write_text("\n".join(lines) + "\n")
    encoder = tmp_path / "encoder.pt"
    from fastbd.models.encoders import small_encoder

    torch.save(small_encoder(4, 32).backbone.state_dict(), encoder)
    assert main(["--quiet", "eval", "ssl", "--checkpoint", str(encoder), "--arch", "smallconv4",
                 "--train-list", str(source / "train.txt"), "--val-list", str(bad), "--out",
                 str(tmp_path / "eval")]) == 2
    error = one_line_error(capsys, "eval")
    assert f"{bad}:2: label 57" in error


@pytest.mark.parametrize("command", ["train-ssl", "train-clip"])
def test_zero_epochs_is_refused_instead_of_saving_an_untrained_model(tmp_path, capsys,
                                                                     command):
    out = tmp_path / "out"
    assert main(["--quiet", command, "--n-train", "20", "--n-eval", "4", "--epochs", "0",
                 "--out", str(out)]) == 2
    assert "epochs is 0" in one_line_error(capsys, command)
    assert not (out / "manifest.json").exists()


def test_icutmix_with_a_method_it_is_not_defined_for_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "train-ssl", "--n-train", "20", "--n-eval", "4", "--icutmix",
                 "--out", str(out)]) == 2  # the world's SimCLR
    assert "icutmix follows PatchSearch's MoCo v3 recipe" in one_line_error(capsys, "train-ssl")
    assert not (out / "manifest.json").exists()


def test_unwritable_or_file_typed_out_exits_2_before_any_work(world, tmp_path, capsys,
                                                              monkeypatch):
    import fastbd.world.threats

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(fastbd.world.threats, "train_ssl", no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    train = ["--quiet", "train-ssl", "--n-train", "40", "--n-eval", "10", "--cache",
             str(tmp_path / "cache")]
    assert main([*train, "--out", str(blocker)]) == 2
    assert f"output folder {blocker} is a file" in one_line_error(capsys, "train-ssl")
    assert main([*train, "--out", str(blocker / "sub")]) == 2
    assert f"{blocker} is a file" in one_line_error(capsys, "train-ssl")
    unwritable = Path("/sys/fastbd-test-out")  # mkdir is refused there, even to root
    assert main([*train, "--out", str(unwritable)]) == 2
    assert f"output folder {unwritable} is not writable" in one_line_error(capsys, "train-ssl")
    assert main(detect_args(world, blocker)) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    missing = tmp_path / "new" / "deeper"
    assert check_writable_dir(missing) == missing
    assert not (tmp_path / "new").exists()  # the check created nothing that stayed


# --- fail loudly --------------------------------------------------------------------------------

def test_negative_labels_and_duplicates(world, tmp_path, capsys, caplog):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nb.png -1\n")
    with pytest.raises(ValueError, match=r"list.txt:2: label -1 is negative"):
        read_file_list(listing)
    source = [f"{world / 'src'}/{line}"
              for line in (world / "src" / "train.txt").read_text().splitlines()]
    listing.write_text("\n".join([*source, source[0]]) + "\n")
    with caplog.at_level("WARNING"):
        assert len(read_file_list(listing).paths) == 61
    assert "1 duplicate path(s), e.g. line 61 repeats line 1" in caplog.text
    args = detect_args(world, tmp_path / "out", "--refuse-duplicates")
    args[args.index("--file-list") + 1] = str(listing)
    assert main(args) == 2
    assert "line 61 repeats line 1" in one_line_error(capsys)


def test_a_symlinked_result_sub_folder_is_refused_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "all_top_poison_patches").symlink_to(elsewhere, target_is_directory=True)
    assert main(detect_args(world, out)) == 2
    assert "all_top_poison_patches is a symbolic link" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["all_top_poison_patches"]  # no work done
    assert not any(elsewhere.iterdir())


def test_a_label_too_large_for_a_class_index_names_the_line(world, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    first = (world / "src" / "train.txt").read_text().splitlines()[0]
    listing.write_text(f"{world / 'src'}/{first}\n{world / 'src'}/{first[:-2]} "
                       f"{10**30}\n")
    args = detect_args(world, tmp_path / "out")
    args[args.index("--file-list") + 1] = str(listing)
    assert main(args) == 2
    assert f"{listing}:2: label {10**30} is not a class index" in one_line_error(capsys)


def test_a_too_long_caption_names_the_csv_line_before_any_image_is_read(clip_csv, tmp_path,
                                                                       capsys):
    root, csv_path = clip_csv
    rows = Path(csv_path).read_text().splitlines()
    header = rows[0].split(",")
    long_row = rows[3].split(",")
    long_row[header.index("caption")] = "a " * 200 + "cat"
    bad = root / "long.csv"
    bad.write_text("\n".join([*rows[:3], ",".join(long_row), "missing.png,a dog,1,0"]) + "\n")
    assert main(["--quiet", "cleanclip", "--csv", str(bad), "--checkpoint", str(root / "m.pt"),
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    error = one_line_error(capsys, "cleanclip")
    assert f"{bad}:4: the caption needs" in error  # not the missing image of line 5


def test_window_argmax_refuses_a_float_window_by_name():
    from fastbd.ops import window_argmax

    with pytest.raises(ValueError, match="window must be a positive int or a"):
        window_argmax(torch.zeros(4, 4), 2.5)
    with pytest.raises(ValueError, match="window height must be a positive int"):
        window_argmax(torch.zeros(4, 4), (0, 2))


def test_an_attack_on_a_csv_without_labels_names_the_column(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\na.png,a cat\na.png,a dog\n")
    assert main(["--quiet", "attack", "--attack", "badnet", "--csv", str(pairs), "--out",
                 str(tmp_path / "out")]) == 2
    assert f"{pairs}: no column 'label'" in one_line_error(capsys, "attack")


def test_a_reference_object_without_transparency_is_warned_about(tmp_path, caplog):
    from fastbd.data.bank import load_reference_object

    Image.new("RGB", (6, 4), (200, 10, 10)).save(tmp_path / "opaque.png")
    with caplog.at_level("WARNING", logger="fastbd"):
        obj = load_reference_object(tmp_path / "opaque.png")
    assert obj.shape == (4, 4, 6) and bool((obj[3] == 255).all())
    assert "opaque.png has no transparency" in caplog.text
    caplog.clear()
    Image.new("RGBA", (6, 4), (200, 10, 10, 0)).save(tmp_path / "cut.png")
    with caplog.at_level("WARNING", logger="fastbd"):
        load_reference_object(tmp_path / "cut.png")
    assert "transparency" not in caplog.text


@pytest.mark.parametrize("lines,expected", [
    (["0", "1", "1", "0", "0"], [False, True, True, False, False]),  # one flag per image
    (["1", "3"], [False, True, False, True, False]),  # indices
    (["4"], [False, False, False, False, True]),
])
def test_a_ground_truth_text_file_of_flags_or_indices(tmp_path, lines, expected):
    from fastbd.data.readers import read_ground_truth

    path = tmp_path / "truth.txt"
    path.write_text("\n".join(lines) + "\n")
    assert read_ground_truth(path, 5).tolist() == expected


def test_an_ambiguous_or_repeated_ground_truth_is_refused(tmp_path):
    from fastbd.data.readers import read_ground_truth

    path = tmp_path / "truth.txt"
    path.write_text("0\n1\n")
    with pytest.raises(ValueError, match="could be flags or indices"):
        read_ground_truth(path, 2)
    path.write_text("3\n1\n3\n")
    with pytest.raises(ValueError, match=r"truth.txt:3: index 3 is listed again \(line 1\)"):
        read_ground_truth(path, 5)
    path.write_text("1\n99999999999999999999999\n")
    with pytest.raises(ValueError, match=r"truth.txt:2: index 99999999999999999999999 is not"):
        read_ground_truth(path, 5)


def test_files_skipped_by_an_attack_are_listed_in_attack_json(world, tmp_path):
    listing = tmp_path / "list.txt"
    source = [f"{world / 'src'}/{line}"
              for line in (world / "src" / "train.txt").read_text().splitlines()[:20]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    listing.write_text("\n".join([*source, f"{tmp_path / 'broken.png'} 3"]) + "\n")
    out = tmp_path / "out"
    assert main(["--quiet", "attack", "--attack", "htba", "--file-list", str(listing),
                 "--image-size", "32", "--fraction", "0.5", "--target", "1", "--skip-bad",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "attack.json").read_text())
    assert summary["images"] == 20
    assert [Path(entry[0]).name for entry in summary["skipped"]] == ["broken.png"]


def test_mask_fill_refuses_a_nan_fill_and_a_float_window():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    positions = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="fill must be a finite number, got nan"):
        mask_fill(images, positions, 2, (0.5,) * 3, (0.5,) * 3, fill=math.nan)
    with pytest.raises(ValueError, match="window must be a positive int, got 2.5"):
        mask_fill(images, positions, 2.5, (0.5,) * 3, (0.5,) * 3)


# --- stale and torn results ---------------------------------------------------------------------

def test_a_new_run_removes_the_previous_result_first(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(detect_args(world, out)) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert {"result.json", "scores.npy", "removed.npy", "filtered.txt"} <= set(
        manifest["files"])
    from fastbd.detection import Detector

    def broken(*args, **kwargs):
        raise ValueError("the encoder broke")

    monkeypatch.setattr(Detector, "fit", broken)
    assert main(detect_args(world, out)) == 2
    capsys.readouterr()
    left = {p.name for p in out.iterdir()}
    assert not left & {"result.json", "scores.npy", "removed.npy", MANIFEST}
    assert "bank.npy" in left  # the image cache is not a result: it stays for the rerun


def test_a_planted_manifest_deletes_nothing_outside_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "mine.txt").write_text("")
    names = ["../outside/precious.txt", str(outside / "precious.txt"), "link/precious.txt",
             "mine.txt"]
    (out / MANIFEST).write_text(json.dumps({"files": names}))
    assert remove_result(out) == ["mine.txt"]
    assert (outside / "precious.txt").read_text() == "keep"


def test_a_failed_save_leaves_no_manifest_and_no_temporary_files(tmp_path, monkeypatch):
    import fastbd.report.plots as plots

    files = ResultFiles(tmp_path)
    files.text("a.txt", "old")
    files.close()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    files = ResultFiles(tmp_path)  # removes a.txt and the manifest first
    files.text("b.txt", "new")
    monkeypatch.setattr(plots.plt.Figure, "savefig", broken)
    fig = plots.plt.figure()
    with pytest.raises(OSError), atomic_output(files.path("plot.png")) as handle:
        fig.savefig(handle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]  # no manifest, no .tmp


def test_an_interrupted_save_keeps_the_classifier_state(world, tmp_path, capsys, monkeypatch):
    import fastbd.report.plots as plots

    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_score_histogram", interrupted)
    assert main(detect_args(world, out)) == 130
    capsys.readouterr()
    assert list(out.glob("classifier-member*.pt")) and not (out / MANIFEST).exists()
    monkeypatch.undo()
    assert main(detect_args(world, out, "--resume")) == 0
    assert (out / MANIFEST).exists() and not list(out.glob("classifier-member*.pt"))


# --- interruptions ------------------------------------------------------------------------------

def test_sigterm_is_handled_like_ctrl_c(world, tmp_path, capsys, monkeypatch):
    import fastbd.detection.search as search

    out = tmp_path / "out"
    real = search.SearchState.save
    rounds = []

    def terminated_after_two_rounds(self, path):
        real(self, path)
        rounds.append(1)
        if len(rounds) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(search.SearchState, "save", terminated_after_two_rounds)
    assert main(detect_args(world, out)) == 143
    assert capsys.readouterr().err == (
        f"fastbd poisoncam: terminated; rerun with --resume to continue from the last "
        f"completed search round and the poison classifier's last saved state in {out}\n")
    first = search.SearchState.load(out / "search_state.pt")
    assert first.round == 2 and first.stage_seconds["search"] > 0
    monkeypatch.undo()
    assert main(detect_args(world, out, "--resume")) == 0
    timings = json.loads((out / "result.json").read_text())["timings_s"]
    assert timings["search"] > first.stage_seconds["search"]  # the first two rounds count
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main restores the handler


# --- shared CLIP fixture ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_csv(tmp_path_factory):
    from fastbd.data.readers import export_images
    from fastbd.models.clip import tiny_clip
    from fastbd.world.synthetic import WorldConfig, make_world

    root = tmp_path_factory.mktemp("pairs")
    pairs = make_world(WorldConfig(n_train=24, n_eval=2, seed=5))
    files = export_images(root, pairs.train.images, pairs.train.labels, None,
                          pairs.train.captions)
    torch.save(tiny_clip(seed=1).state_dict(), root / "m.pt")
    (root / "ubt.json").write_text(json.dumps(
        {"susp_fraction": 0.25, "overfit_epochs": 1, "unlearn_epochs": 1, "overfit_min_steps": 0,
         "unlearn_min_steps": 0, "batch_size": 8, "skip_check": True}))
    return root, files["csv"]

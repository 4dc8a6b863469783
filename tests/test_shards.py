"""WebDataset shards as CLIP pairs: the same pairs as the CSV they were written from, streamed
to a memory-mapped cache, bad samples refused or skipped, and the CLI's defenses and trainer
giving the CSV's results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbd.cli import main


def _write_shards(csv_path: Path, folder: Path, per_shard: int, corrupt: int | None = None,
                  unflagged: int | None = None) -> str:
    """The CSV's pairs as shards of ``per_shard`` samples (png, txt, json with label and
    is_backdoor), in the CSV's order; sample ``corrupt`` gets bytes no decoder reads, sample
    ``unflagged`` a json without ``is_backdoor``."""
    import webdataset as wds

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), per_shard):
        with wds.TarWriter(str(folder / f"pairs-{start // per_shard:03d}.tar")) as writer:
            for i, row in enumerate(rows[start:start + per_shard], start=start):
                image = (csv_path.parent / row["image"]).read_bytes()
                writer.write({"__key__": f"{i:06d}",
                              "png": b"not an image" if i == corrupt else image,
                              "txt": row["caption"],
                              "json": {"label": int(row["label"]),
                                       **({} if i == unflagged else
                                          {"is_backdoor": int(row["is_backdoor"])})}})
    last = (len(rows) - 1) // per_shard
    return str(folder / f"pairs-{{000..{last:03d}}}.tar")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("badnet")
    assert main(["--quiet", "attack", "--attack", "badnet", "--n-train", "120", "--n-eval", "30",
                 "--rate", "0.05", "--out", str(out)]) == 0
    return out


def test_shards_hold_the_same_pairs_as_their_csv(exported, tmp_path):
    from fastbd.clipdefense.loading import load_pairs, load_shard_pairs
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=50)
    model = tiny_clip(TinyCLIPConfig())
    from_csv = load_pairs(exported / "train.csv", model, verbose=False)
    from_shards = load_shard_pairs(pattern, model, verbose=False)
    assert torch.equal(from_shards.images, from_csv.images)
    assert torch.equal(from_shards.tokens, from_csv.tokens)
    assert torch.equal(from_shards.truth, from_csv.truth)
    assert torch.equal(from_shards.labels, from_csv.labels)
    assert from_shards.report.kept == list(range(120))


def test_a_shard_bank_is_streamed_to_disk_and_reused_until_a_shard_changes(exported, tmp_path):
    from fastbd.data.shards import read_shard_pairs

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=50)
    direct = read_shard_pairs(pattern, 24, verbose=False)
    cache = tmp_path / "cache" / "pairs.npy"
    cached = read_shard_pairs(pattern, 24, cache=cache, verbose=False)
    on_disk = np.load(cache, mmap_mode="r")
    assert on_disk.shape == (120, 3, 24, 24) and np.array_equal(on_disk, direct.bank.images)
    assert cached.captions == direct.captions and cached.keys == direct.keys
    assert not list(cache.parent.glob(".*.tmp"))  # no scratch file left
    stamp = cache.stat().st_mtime_ns
    again = read_shard_pairs(tmp_path / "shards", 24, cache=cache, verbose=False)  # a folder
    assert cache.stat().st_mtime_ns == stamp and again.captions == direct.captions
    _write_shards(exported / "val.csv", tmp_path / "shards", per_shard=50)  # overwrites 000
    changed = read_shard_pairs(pattern, 24, cache=cache, verbose=False)
    assert changed.captions[:30] != direct.captions[:30]
    assert changed.bank.images.shape[0] == 30 + 70


def test_a_corrupt_sample_is_refused_or_skipped(exported, tmp_path, capsys):
    from fastbd.data.bank import ImageReadError
    from fastbd.data.shards import read_shard_pairs

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=60,
                            corrupt=7)
    with pytest.raises(ImageReadError, match="000007") as raised:
        read_shard_pairs(pattern, 16, verbose=False)
    assert "BytesIO" not in str(raised.value)  # the sample is named, not the in-memory file
    kept = read_shard_pairs(pattern, 16, skip_bad=True, verbose=False)
    assert 7 not in kept.report.kept and len(kept.captions) == 119
    assert "000007" in kept.report.skipped[0][0]
    model = tmp_path / "clip.pt"
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    torch.save(tiny_clip(TinyCLIPConfig()).state_dict(), model)
    flags = ["--quiet", "cleanclip", "--shards", pattern, "--checkpoint", str(model),
             "--out", str(tmp_path / "out")]
    assert main(flags) == 2 and "000007" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard not found"):
        read_shard_pairs(str(tmp_path / "shards" / "pairs-{000..009}.tar"), 16, verbose=False)


def _torn(shard: Path, how: str) -> None:
    data = shard.read_bytes()
    if how == "half":
        shard.write_bytes(data[:len(data) // 2])
    elif how == "at-a-member":  # cut where a member ends: no tar error, only the marker gone
        import tarfile

        with tarfile.open(shard) as archive:
            third = archive.getmembers()[3]
        shard.write_bytes(data[:third.offset_data + -(-third.size // 512) * 512])
    elif how == "random":
        shard.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    else:
        shard.write_bytes(b"")


@pytest.mark.parametrize("how", ["half", "at-a-member", "random", "empty"])
def test_a_torn_or_foreign_shard_is_refused_or_skipped_by_name(exported, tmp_path, capsys,
                                                               how):
    """A half-downloaded, foreign or empty shard is never read in part silently: exit 2 naming
    the shard, or skipped and listed with --skip-bad."""
    from fastbd.data.shards import read_shard_pairs

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=60)
    torn = tmp_path / "shards" / "pairs-001.tar"
    _torn(torn, how)
    with pytest.raises(ValueError, match="pairs-001.tar"):
        read_shard_pairs(pattern, 16, verbose=False)
    kept = read_shard_pairs(pattern, 16, skip_bad=True, verbose=False)
    assert len(kept.captions) == 60
    assert kept.report.skipped[0][0] == str(torn)
    model = tmp_path / "clip.pt"
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    torch.save(tiny_clip(TinyCLIPConfig()).state_dict(), model)
    out = tmp_path / "density"
    flags = ["--quiet", "density", "--shards", pattern, "--checkpoint", str(model), "--out",
             str(out)]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "pairs-001.tar" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main([*flags, "--skip-bad"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["pairs"] == 60
    assert any("pairs-001.tar" in entry[0] for entry in result["skipped"])


def test_cli_defense_and_training_on_shards_equal_the_csv_runs(exported, tmp_path):
    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=50)
    train = ["--epochs", "1", "--batch-size", "32"]
    for name, source in (("csv", ["--csv", str(exported / "train.csv")]),
                         ("shards", ["--shards", pattern])):
        assert main(["--quiet", "train-clip", *source, *train, "--out",
                     str(tmp_path / f"clip-{name}")]) == 0
    from_csv = torch.load(tmp_path / "clip-csv" / "clip.pt", weights_only=True)
    from_shards = torch.load(tmp_path / "clip-shards" / "clip.pt", weights_only=True)
    assert all(torch.equal(from_csv[k], from_shards[k]) for k in from_csv)
    model = str(tmp_path / "clip-csv" / "clip.pt")
    results = {}
    for name, source in (("csv", ["--csv", str(exported / "train.csv")]),
                         ("shards", ["--shards", pattern])):
        out = tmp_path / f"ubt-{name}"
        assert main(["--quiet", "ubt", *source, "--checkpoint", model, "--reference-checkpoint",
                     model, "--out", str(out)]) == 0
        assert not any(p.suffix == ".npy" and "pairs" in p.name for p in out.iterdir())
        results[name] = json.loads((out / "result.json").read_text())
    for key in ("suspicious", "suspicious_poisoned", "check_statistic"):
        assert results["shards"].get(key) == results["csv"].get(key)


def test_cli_refuses_a_csv_and_shards_together(exported, tmp_path, capsys):
    flags = ["--quiet", "train-clip", "--csv", str(exported / "train.csv"), "--shards",
             str(tmp_path), "--out", str(tmp_path / "out")]
    assert main(flags) == 2 and "exactly one of" in capsys.readouterr().err


def test_cli_density_on_shards_lists_the_flagged_samples(exported, tmp_path):
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=50)
    torch.save(tiny_clip(TinyCLIPConfig(), seed=4).state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "density"
    assert main(["--quiet", "density", "--shards", pattern, "--checkpoint",
                 str(tmp_path / "clip.pt"), "--k", "8", "--threshold", "1", "--out",
                 str(out)]) == 0
    flagged = np.load(out / "flagged.npy")
    listed = (out / "flagged.txt").read_text().splitlines()
    assert len(listed) == int(flagged.sum()) > 0
    assert listed == [f"pairs-{i // 50:03d}.tar/{i:06d}" for i in np.flatnonzero(flagged)]
    assert "auroc" in json.loads((out / "result.json").read_text())["metrics"]


def test_one_sample_without_ground_truth_is_named_in_a_warning(exported, tmp_path, caplog):
    """The ground truth of shards is used only when every sample has it: one sample without
    ``is_backdoor`` drops it for the run — said in a warning naming that sample."""
    from fastbd.data.shards import read_shard_pairs

    pattern = _write_shards(exported / "train.csv", tmp_path / "shards", per_shard=60,
                            unflagged=65)
    with caplog.at_level("WARNING", logger="fastbd"):
        read = read_shard_pairs(pattern, 16, verbose=False)
    assert read.truth is None and read.labels is not None
    assert "pairs-001.tar/000065" in caplog.text and "is_backdoor" in caplog.text

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastbd.data.bank import ImageBank, ImageReadError, load_image
from fastbd.data.readers import (
    export_images,
    read_csv_pairs,
    read_file_list,
    read_ground_truth,
    read_image_folder,
    write_csv_pairs,
)


@pytest.fixture
def images(gen):
    return torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=gen)


def test_export_round_trips_file_list_and_csv(tmp_path, images):
    labels = torch.tensor([0, 1, 2, 1, 0])
    mask = torch.tensor([False, True, False, False, True])
    captions = [f"caption, number {i}" for i in range(5)]
    written = export_images(tmp_path, images, labels, mask, captions)
    listing = read_file_list(written["file_list"])
    assert listing.labels == labels.tolist()
    # the names say nothing of the poison; the truth is a file beside the list
    assert [p.name for p in listing.paths] == [f"{i:06d}.png" for i in range(5)]
    assert written["truth"] == tmp_path / "train.poisoned.npy"
    assert torch.equal(read_ground_truth(written["truth"], 5), mask)
    bank, report = ImageBank.from_files(listing.paths, 16, crop_ratio=1.0, verbose=False)
    assert torch.equal(bank.images, images) and report.kept == list(range(5))
    pairs = read_csv_pairs(written["csv"])
    assert pairs.captions == captions
    assert pairs.columns["is_backdoor"] == [str(int(m)) for m in mask.tolist()]
    assert [p.name for p in pairs.paths] == [p.name for p in listing.paths]


def test_marker_names_are_the_patchsearch_convention_on_request(tmp_path, images):
    mask = torch.tensor([False, True, False, False, True])
    written = export_images(tmp_path, images, torch.zeros(5, dtype=torch.long), mask,
                            marker_names=True)
    listing = read_file_list(written["file_list"])
    assert ["HTBA_trigger" in str(p) for p in listing.paths] == mask.tolist()
    clean = export_images(tmp_path, images, torch.zeros(5, dtype=torch.long), name="val")
    assert "truth" not in clean and not (tmp_path / "val.poisoned.npy").exists()


def test_open_clip_tsv(tmp_path, images):
    export_images(tmp_path, images, torch.zeros(5, dtype=torch.long))
    rows = [{"filepath": f"train/{i:06d}.png", "title": f"t{i}"} for i in range(5)]
    path = write_csv_pairs(tmp_path / "pairs.tsv", rows, separator="\t")
    pairs = read_csv_pairs(path, image_key="filepath", caption_key="title", separator="\t")
    assert pairs.captions == [f"t{i}" for i in range(5)] and pairs.paths[0].is_file()
    with pytest.raises(ValueError, match="no column 'image'"):
        read_csv_pairs(path, separator="\t")


def test_image_folder(tmp_path, images):
    for i, name in enumerate(["dog", "cat", "cat"]):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    paths, labels, classes = read_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels == [0, 0, 1] and len(paths) == 3


def test_eval_transform_resizes_and_crops(tmp_path):
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, :40] = 255  # left half white
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 20, crop_ratio=1.0)
    assert out.shape == (3, 20, 20)  # 80×40 → 40×20 → centre crop keeps columns 10–29
    assert bool((out[:, :, :8] == 255).all()) and bool((out[:, :, 12:] == 0).all())


def test_bad_files(tmp_path, images):
    export_images(tmp_path, images[:2], torch.zeros(2, dtype=torch.long))
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png at all")
    paths = [tmp_path / "train/000000.png", tmp_path / "train/broken.png",
             tmp_path / "train/missing.png", tmp_path / "train/000001.png"]
    with pytest.raises(ImageReadError, match="broken.png"):
        ImageBank.from_files(paths, 16, crop_ratio=1.0, verbose=False)
    bank, report = ImageBank.from_files(paths, 16, crop_ratio=1.0, skip_bad=True, verbose=False)
    assert len(bank) == 2 and report.kept == [0, 3]
    assert [p for p, _ in report.skipped] == [str(paths[1]), str(paths[2])]
    assert "file not found" in report.skipped[1][1]


def test_file_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_file_list(tmp_path / "none.txt")
    (tmp_path / "bad.txt").write_text("a.png x\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_file_list(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n# comment\n")
    with pytest.raises(ValueError, match="no entries"):
        read_file_list(tmp_path / "empty.txt")


def test_bank_save_load_mmap_and_chunks(tmp_path, images):
    bank = ImageBank(images)
    path = bank.save(tmp_path / "bank.npy")
    mapped = ImageBank.load(path)
    assert torch.equal(mapped.images, images)
    assert torch.equal(mapped.batch([4, 0]), images[[4, 0]])
    starts = [start for start, chunk in mapped.chunks(2)]
    assert starts == [0, 2, 4]
    with pytest.raises(ValueError, match="uint8 N×3×S×S"):
        ImageBank(torch.zeros(2, 3, 4, 4))


def test_bank_cache_is_reused_only_for_the_files_it_was_built_from(tmp_path, images,
                                                                    monkeypatch):
    import fastbd.data.bank as bank_module

    export_images(tmp_path, images, torch.zeros(5, dtype=torch.long))
    paths = sorted((tmp_path / "train").glob("*.png"))
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "bank.npy"
    with_bad = [*paths[:2], tmp_path / "train" / "broken.png", *paths[2:]]
    built, report = ImageBank.from_files(with_bad, 16, crop_ratio=1.0, skip_bad=True,
                                         cache=cache, verbose=False)
    assert torch.equal(built.images, images) and report.kept == [0, 1, 3, 4, 5]
    # written row by row into the file and compacted past the bad one; no temporary left
    assert torch.equal(torch.from_numpy(np.load(cache)), images)
    assert sorted(p.name for p in tmp_path.glob("bank*")) == ["bank.json", "bank.npy"]

    reads = []
    real_load = bank_module.load_image
    monkeypatch.setattr(bank_module, "load_image",
                        lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    cached, again = ImageBank.from_files(with_bad, 16, crop_ratio=1.0, skip_bad=True,
                                         cache=cache, verbose=False)
    assert reads == [] and torch.equal(cached.images, images)
    assert again.kept == report.kept and again.skipped == report.skipped
    with pytest.raises(ImageReadError, match="broken.png"):  # as an uncached read would
        ImageBank.from_files(with_bad, 16, crop_ratio=1.0, cache=cache, verbose=False)
    reads.clear()
    ImageBank.from_files(paths, 16, crop_ratio=1.0, cache=cache, verbose=False)
    assert len(reads) == 5  # another list: rebuilt
    reads.clear()
    ImageBank.from_files(paths, 8, crop_ratio=1.0, cache=cache, verbose=False)
    assert len(reads) == 5  # another size
    flipped = images[0].flip(-1).permute(1, 2, 0).numpy()
    Image.fromarray(flipped).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a changed image, whatever the clock's resolution
    reads.clear()
    rebuilt, _ = ImageBank.from_files(paths, 16, crop_ratio=1.0, cache=cache, verbose=False)
    assert len(reads) == 5 and torch.equal(rebuilt.images[0], images[0].flip(-1))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bank_module, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ImageBank.from_files(with_bad, 16, crop_ratio=1.0, skip_bad=True, cache=cache,
                             verbose=False)
    assert not (tmp_path / "bank.json").exists()  # a half-built bank is never reused


def test_host_rows_read_like_a_device_tensor(gen):
    from fastbd.data.bank import HostRows

    images = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8, generator=gen)
    rows = HostRows(images, "cpu")
    assert rows.shape == images.shape and rows.dtype == torch.uint8 and len(rows) == 7
    index = torch.tensor([6, 0, 0, 3])
    assert torch.equal(rows[index], images[index])
    assert torch.equal(rows[2:5], images[2:5]) and torch.equal(rows[::3], images[::3])
    assert rows[torch.zeros(0, dtype=torch.long)].shape == (0, 3, 5, 5)
    with pytest.raises(AttributeError):
        rows.float()  # nothing reads the whole bank at once


def test_large_banks_stay_in_host_memory():
    from fastbd.data.bank import HostRows, bank_placement, place_images

    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)  # 480 bytes
    assert bank_placement(images, "cuda", "auto", free_bytes=959) == "host"
    assert bank_placement(images, "cuda", "auto", free_bytes=960) == "device"
    assert bank_placement(images, "cpu", "auto", free_bytes=1) == "device"  # already there
    assert bank_placement(images, "cuda", "host") == "host"
    assert place_images(images, "cpu") is images
    assert isinstance(place_images(images, "cpu", "host"), HostRows)
    assert place_images(images, "cpu", "device") is images
    with pytest.raises(ValueError, match="placement"):
        place_images(images, "cpu", "disk")


def test_training_state_skips_saves_within_its_interval(tmp_path):
    from torch import nn

    from fastbd.storage import TrainingState

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = TrainingState(tmp_path / "state.pt", {"a": 1}, (), {"model": model}, optimizer,
                          save_every_s=1e9)
    assert saved.restore() == 0
    saved.save(1)
    assert not (tmp_path / "state.pt").exists()
    saved.save(2, extra={"k": [3]}, final=True)
    again = TrainingState(tmp_path / "state.pt", {"a": 1}, (), {"model": nn.Linear(2, 2)},
                          torch.optim.SGD(model.parameters(), lr=0.1))
    assert again.restore() == 2 and again.extra == {"k": [3]}
    assert again.seconds >= again.seconds_before >= 0
    other = TrainingState(tmp_path / "state.pt", {"a": 2}, (), {"model": model}, optimizer)
    assert other.restore(refuse_other=False) == 0 and other.extra == {}
    with pytest.raises(ValueError, match="belongs to another run"):
        other.restore()

def test_stage_files_load_only_their_own_run(tmp_path):
    from fastbd.storage import StageFiles

    mine = StageFiles(tmp_path, "ubt", {"config": 1})
    assert mine.load("split") is None
    mine.save("split", {"x": torch.arange(3)})
    assert torch.equal(mine.load("split")["x"], torch.arange(3))
    assert StageFiles(tmp_path, "ubt", {"config": 2}).load("split") is None
    StageFiles(tmp_path, "abl", {"config": 1}).save("split", {})
    mine.clear()
    assert [p.name for p in tmp_path.iterdir()] == ["abl-split.pt"]
    nowhere = StageFiles(None, "ubt", {})
    nowhere.save("split", {"x": 1})
    assert nowhere.load("split") is None and nowhere.path("split") is None


def test_threaded_reads_keep_the_list_order(tmp_path, gen):
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    export_images(tmp_path, images, torch.zeros(40, dtype=torch.long))
    paths = sorted((tmp_path / "train").glob("*.png"))
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png")
    mixed = [*paths[:7], tmp_path / "train" / "broken.png", *paths[7:30],
             tmp_path / "train" / "gone.png", *paths[30:]]
    serial, serial_report = ImageBank.from_files(mixed, 8, crop_ratio=1.0, skip_bad=True,
                                                 verbose=False, workers=1)
    threaded, report = ImageBank.from_files(mixed, 8, crop_ratio=1.0, skip_bad=True,
                                            verbose=False, workers=3)
    assert torch.equal(threaded.images, images) and torch.equal(serial.images, images)
    assert report.kept == serial_report.kept and report.skipped == serial_report.skipped
    assert [p for p, _ in report.skipped] == [str(mixed[7]), str(mixed[31])]
    # small files are read in this thread; force the thread pool (tasks of 4, in flight 3·64)
    from fastbd.data.bank import _ordered_reads

    pooled = list(_ordered_reads(mixed, 8, 1.0, 3, per_task=4, parallel_above_s=0.0))
    assert [str(p) for p, _ in pooled] == [str(p) for p in mixed]
    kept = [image for _, image in pooled if not isinstance(image, ImageReadError)]
    assert torch.equal(torch.stack(kept), images)
    assert [i for i, (_, image) in enumerate(pooled) if isinstance(image, ImageReadError)] \
        == [7, 31]
    assert list(_ordered_reads([], 8, 1.0, 3, parallel_above_s=0.0)) == []
    for listed, first_bad in ((mixed, "broken.png"), (mixed[::-1], "gone.png")):
        with pytest.raises(ImageReadError, match=first_bad):  # the first bad file listed
            ImageBank.from_files(listed, 8, crop_ratio=1.0, verbose=False, workers=3)

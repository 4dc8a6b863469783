"""WebDataset shards (``.tar`` files of ``<key>.jpg`` / ``<key>.txt`` members, the format CC3M
and LAION are distributed in) read as image–caption pairs through the ``webdataset`` package.

Samples are streamed: one sample's bytes are in memory at a time, and with a ``cache`` the
decoded images go straight to a memory-mapped ``.npy`` on disk, so a bank larger than memory
can be built. A sample may carry a ``json`` member whose ``label`` (class index) and
``is_backdoor`` (0/1) fields become the pairs' labels and ground truth.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastbd.data.bank import ImageBank, ImageReadError, LoadReport, load_image
from fastbd.data.readers import MAX_CLASSES
from fastbd.distributed import barrier, world
from fastbd.storage import scratch_file, write_text_atomically

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as the sample's image, in this order of preference."""
HEADER_BYTES = 128
"""The ``.npy`` header a streamed bank reserves before its rows (rewritten with the final
shape once the row count is known; 128 bytes hold any realistic shape)."""


@dataclass
class ShardPairs:
    """uint8 ``bank`` ``N×3×S×S``, the ``captions`` and sample ``keys`` (``<shard>/<key>``) of
    the kept samples, optional int64 ``labels`` and bool ``truth`` ``N`` (from every sample's
    ``json`` member, None when absent), and the ``report`` (kept sample indices in stream
    order, skipped samples with their reasons)."""

    bank: ImageBank
    captions: list[str]
    keys: list[str]
    labels: torch.Tensor | None
    truth: torch.Tensor | None
    report: LoadReport


def expand_shards(urls: str | Path | list[str | Path]) -> list[str]:
    """Shard paths from a brace pattern (``data/{000..009}.tar``; ``::`` joins several, as
    webdataset expands them), a folder (its ``.tar`` files, sorted) or a list of either. Every
    shard must exist."""
    from webdataset.shardlists import expand_urls

    names = [str(urls)] if isinstance(urls, str | Path) else [str(u) for u in urls]
    expanded: list[str] = []
    for name in names:
        if Path(name).is_dir():
            expanded += sorted(str(p) for p in Path(name).glob("*.tar"))
        else:
            expanded += expand_urls(name)
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    missing = [s for s in expanded if not Path(s).is_file()]
    if missing:
        raise ValueError(f"shard not found: {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return expanded


TAR_BLOCK = 512


def shard_problem(path: str | Path) -> str | None:
    """What makes shard ``path`` unreadable or incomplete, or None when it is a whole tar
    archive: an empty file, bytes that are not a tar archive, a member whose data runs past the
    end of the file, or — for an uncompressed archive — no end-of-archive marker (two zero
    blocks) after the last member, which is how a download cut at a member boundary looks. Only
    headers are read (members are seeked over) for an uncompressed shard; a compressed one is
    decompressed once."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
            compressed = archive.fileobj is not None and not isinstance(
                archive.fileobj, io.BufferedReader)
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        return f"not a complete tar archive ({error})"
    if not members:
        return "holds no members"
    if compressed:
        return None
    last = max(members, key=lambda m: m.offset_data)
    end = last.offset_data + -(-last.size // TAR_BLOCK) * TAR_BLOCK
    with open(path, "rb") as handle:
        handle.seek(end)
        marker = handle.read(2 * TAR_BLOCK)
    if len(marker) < 2 * TAR_BLOCK or any(marker):
        return (f"truncated: no end-of-archive marker after its last member ({last.name}); "
                "a partial download?")
    return None


def checked_shards(shards: list[str], skip_bad: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """The whole shards of ``shards`` and the (shard, problem) of the others
    (``shard_problem``); without ``skip_bad`` the first problem raises ``ValueError`` naming
    the shard."""
    whole, bad = [], []
    for shard in shards:
        problem = shard_problem(shard)
        if problem is None:
            whole.append(shard)
            continue
        if not skip_bad:
            raise ValueError(f"shard {shard}: {problem} (--skip-bad skips it)")
        log.warning("skipping shard %s: %s", shard, problem)
        bad.append((shard, problem))
    if not whole:
        raise ValueError(f"no readable shard among {len(shards)}")
    return whole, bad


def _samples(shards: list[str]) -> Iterator[dict]:
    import webdataset as wds

    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False,
                             nodesplitter=None, workersplitter=None)
    yield from dataset


def _decode(sample: dict, size: int, crop_ratio: float, caption_key: str
            ) -> tuple[torch.Tensor, str, dict]:
    name = f"{sample.get('__url__', '?')}/{sample['__key__']}"
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        raise ImageReadError(name, f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    if caption_key not in sample:
        raise ValueError(f"{name}: no caption member .{caption_key}")
    try:
        caption = sample[caption_key].decode("utf-8").strip()
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{name}: unreadable caption or json ({error})") from None
    image = load_image(io.BytesIO(sample[image_key]), size, crop_ratio, name=name)
    return image, caption, meta


def read_shard_pairs(urls: str | Path | list[str | Path], size: int, *, crop_ratio: float = 1.0,
                     caption_key: str = "txt", skip_bad: bool = False,
                     cache: str | Path | None = None, verbose: bool = True) -> ShardPairs:
    """Stream the pairs of WebDataset shards: each image through the eval transform at
    ``size`` (``crop_ratio`` 1: CLIP's resize and centre crop), its ``caption_key`` member as
    the caption. A sample whose image cannot be decoded raises ``ImageReadError`` unless
    ``skip_bad``; one without a caption or with a malformed ``json`` member raises
    ``ValueError``. Every shard is checked first (``shard_problem``: truncated, empty, not a
    tar archive): a bad one raises ``ValueError`` naming it, or with ``skip_bad`` is skipped
    and listed in ``report.skipped``. With ``cache`` the images are written to that ``.npy``
    as they are decoded and memory-mapped (reused, with a ``.pairs.json`` of captions and keys
    beside it, while the shards, ``size`` and ``crop_ratio`` are unchanged). In a
    ``torch.distributed`` world with ``cache`` (on a filesystem every rank sees), rank 0
    streams the shards into it while the others wait, then every rank maps it (every rank must
    call this)."""
    from fastbd.data.bank import _files_key

    shards = expand_shards(urls)
    manifest = {"size": size, "crop_ratio": crop_ratio, "caption_key": caption_key,
                "skip_bad": skip_bad, "shards": _files_key(shards)}
    if cache is not None:
        if world().size > 1 and not world().main:
            barrier()  # rank 0 builds it
            reused = _reuse(Path(cache), manifest)
            if reused is None:
                raise ValueError(f"rank 0 left no usable shard bank at {cache}: is it on a "
                                 "filesystem every rank sees?")
            return reused
        reused = _reuse(Path(cache), manifest)
        if reused is not None:
            barrier()
            return reused
    built = _stream_shards(shards, manifest, size, crop_ratio, caption_key, skip_bad, cache,
                           verbose)
    if cache is not None:
        barrier()
    return built


def _stream_shards(shards: list[str], manifest: dict, size: int, crop_ratio: float,
                   caption_key: str, skip_bad: bool, cache: str | Path | None, verbose: bool
                   ) -> ShardPairs:
    """``read_shard_pairs``' reading and caching, in this process."""
    rows: list[torch.Tensor] = []
    captions, keys, metas = [], [], []
    report = LoadReport()
    shards, report.skipped = checked_shards(shards, skip_bad)
    writer = _RowWriter(Path(cache), size) if cache is not None else None
    try:
        for index, sample in enumerate(tqdm(_samples(shards), desc="shards", unit="pair",
                                            disable=not verbose)):
            try:
                image, caption, meta = _decode(sample, size, crop_ratio, caption_key)
            except ImageReadError as error:
                if not skip_bad:
                    raise
                report.skipped.append((error.path, error.reason))
                continue
            report.kept.append(index)
            captions.append(caption)
            keys.append(f"{Path(sample.get('__url__', '')).name}/{sample['__key__']}")
            metas.append(meta)
            if writer is not None:
                writer.append(image)
            else:
                rows.append(image)
        if not captions:
            raise ValueError(f"no readable pairs in {len(shards)} shard(s)")
        if writer is not None:
            writer.finish(len(captions))
    finally:
        if writer is not None:
            writer.close()
    if report.skipped:
        log.warning("skipped %d unreadable sample(s), e.g. %s: %s", len(report.skipped),
                    *report.skipped[0])
    labels, truth = _labels_and_truth(metas, keys)
    if cache is None:
        bank = ImageBank(torch.stack(rows))
    else:
        bank = ImageBank.load(cache)
        sidecar = {"captions": captions, "keys": keys, "metas": metas, "kept": report.kept,
                   "skipped": report.skipped}
        write_text_atomically(json.dumps(sidecar), _sidecar(cache))
        write_text_atomically(json.dumps(manifest), Path(cache).with_suffix(".json"))
    return ShardPairs(bank, captions, keys, labels, truth, report)


def _labels_and_truth(metas: list[dict], keys: list[str]
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The samples' ``label`` and ``is_backdoor`` fields, each None unless every sample has it
    (a field most samples have and some lack is warned about, naming one that lacks it)."""
    def column(name: str):
        lacking = [key for key, meta in zip(keys, metas, strict=True) if name not in meta]
        if lacking and len(lacking) < len(metas):
            log.warning("%d of %d samples have no %r in their json (e.g. %s): no sample's %s is "
                        "used", len(lacking), len(metas), name, lacking[0], name)
        if not metas or lacking:
            return None
        return [m[name] for m in metas]

    labels, flags = column("label"), column("is_backdoor")
    if labels is not None:
        bad = next((key for key, v in zip(keys, labels, strict=True)
                    if isinstance(v, bool) or not isinstance(v, int)
                    or not 0 <= v < MAX_CLASSES), None)
        if bad is not None:
            raise ValueError(f"{bad}: the json 'label' is not a class index (an integer in "
                             f"[0, {MAX_CLASSES:,}))")
    return (None if labels is None else torch.tensor(labels, dtype=torch.int64),
            None if flags is None else torch.tensor([bool(v) for v in flags]))


def _sidecar(cache: str | Path) -> Path:
    return Path(cache).with_suffix(".pairs.json")


def remove_shard_cache(cache: str | Path) -> None:
    """Delete a shard bank cache: the ``.npy``, its manifest and its captions."""
    for path in (Path(cache), Path(cache).with_suffix(".json"), _sidecar(cache)):
        path.unlink(missing_ok=True)


def _reuse(cache: Path, manifest: dict) -> ShardPairs | None:
    try:
        if json.loads(cache.with_suffix(".json").read_text()) != manifest:
            return None
        sidecar = json.loads(_sidecar(cache).read_text())
        bank = ImageBank.load(cache)
    except (OSError, ValueError):
        return None
    if bank.images.shape[0] != len(sidecar["captions"]):
        return None
    labels, truth = _labels_and_truth(sidecar["metas"], sidecar["keys"])
    report = LoadReport(kept=sidecar["kept"], skipped=[tuple(s) for s in sidecar["skipped"]])
    log.info("reusing the shard bank %s (%d pairs)", cache, len(sidecar["captions"]))
    return ShardPairs(bank, sidecar["captions"], sidecar["keys"], labels, truth, report)


class _RowWriter:
    """Rows of uint8 ``3×S×S`` appended to a scratch file after a reserved ``.npy`` header,
    which ``finish`` writes once the row count is known; the file then replaces ``cache``."""

    def __init__(self, cache: Path, size: int) -> None:
        Path(cache).with_suffix(".json").unlink(missing_ok=True)  # no manifest while writing
        self.cache = cache
        self.size = size
        self.partial = scratch_file(cache)
        self.handle = open(self.partial, "wb")
        self.handle.write(b"\0" * HEADER_BYTES)

    def append(self, image: torch.Tensor) -> None:
        self.handle.write(image.numpy().tobytes())

    def finish(self, rows: int) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                  "fortran_order": False, "shape": (rows, 3, self.size, self.size)}
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, header)
        if buffer.tell() > HEADER_BYTES:
            raise ValueError(f"shape {header['shape']} needs a longer .npy header")
        text = buffer.getvalue()
        # Pad the header's dictionary with spaces to the reserved length (the format allows
        # it: the length field counts them, the newline stays last).
        padding = HEADER_BYTES - len(text)
        length = int.from_bytes(text[8:10], "little") + padding
        text = text[:8] + length.to_bytes(2, "little") + text[10:-1] + b" " * padding + b"\n"
        self.handle.seek(0)
        self.handle.write(text)
        self.handle.close()
        os.replace(self.partial, self.cache)

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.partial.unlink(missing_ok=True)

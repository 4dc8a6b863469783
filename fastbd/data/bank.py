"""``ImageBank``: the one uint8 image store every stage indexes into.

A bank holds uint8 ``N×3×S×S`` images at the encoder's input size, built once through the eval
transform (resize the shorter side to ``S / crop_ratio``, centre-crop ``S``). Small banks live on
a device; large ones are a memory-mapped ``.npy`` read in chunks (optionally pinned for fast
host→device copies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fastbd.distributed import barrier, broadcast_object, gather_objects, shard, world
from fastbd.storage import atomic_path, scratch_file, write_text_atomically

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file could not be read; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL modes of one-channel images with 16-bit samples (16-bit PNG/TIFF/PGM open as one of
these; ``I`` is read as 16-bit too). ``convert("RGB")`` would clip their 0–65535 range to
0–255, so ``to_rgb`` rescales them."""


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
           ) -> Image.Image:
    """An 8-bit RGB view of any PIL image: 16-bit samples scaled to 8 bits (``v / 257``,
    rounded), transparency (RGBA, LA, PA, palette or grey with a transparent colour)
    composited over ``background``; every other mode through PIL's own conversion."""
    if img.mode in SIXTEEN_BIT_MODES:
        samples = np.asarray(img, dtype=np.float64).clip(0, 65535)
        return Image.fromarray(np.rint(samples / 257).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        canvas = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


@contextmanager
def reading_image(label: object) -> Iterator[None]:
    """Inside, any failure to read an image — missing, corrupt, unsupported, or so large that
    PIL refuses to decode it (a decompression bomb) — becomes ``ImageReadError`` naming
    ``label``."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(label, "file not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(label, f"too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(label, "corrupt or unsupported (not an image format PIL reads)"
                             ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(label, f"corrupt or unsupported ({exc})") from None


def load_image(path: str | Path | BinaryIO, size: int, crop_ratio: float = 224 / 256, *,
               name: str | None = None) -> torch.Tensor:
    """One file (a path, or an open binary file such as a shard member's bytes, then named
    ``name`` in errors) through the eval transform (``to_rgb``, shorter side to
    ``size / crop_ratio``, centre crop) → uint8 ``3×size×size``. Any failure — missing,
    corrupt, unsupported, or so large that PIL refuses to decode it (a decompression bomb) —
    raises ``ImageReadError`` naming the file."""
    label = name if name is not None else path
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    with reading_image(label), Image.open(path) as img:
        img = to_rgb(img)
        short = round(size / crop_ratio)
        w, h = img.size
        scale = short / min(w, h)
        if (round(w * scale), round(h * scale)) != (w, h):
            img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                             Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_trigger(path: str | Path) -> torch.Tensor:
    """A trigger image at its own size: uint8 ``3×s×s``, the centred square of side ``s`` =
    the file's shorter side (RGB; transparency dropped). Failures raise ``ImageReadError``
    naming the file."""
    with reading_image(path), Image.open(path) as img:
        side = min(img.size)
    return load_image(path, side, crop_ratio=1.0)


def load_reference_object(path: str | Path) -> torch.Tensor:
    """A reference object for CorruptEncoder at its own size: uint8 ``4×h×w`` — RGB and the
    file's transparency as the object's mask (RGBA, LA, a transparent palette colour), or fully
    opaque when the file has none. Failures raise ``ImageReadError`` naming the file."""
    with reading_image(path), Image.open(path) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
        rgba = img.convert("RGBA") if has_alpha else to_rgb(img).convert("RGBA")
        array = np.asarray(rgba, dtype=np.uint8)
    if not has_alpha:
        log.warning("reference object %s has no transparency: the whole image is pasted as an "
                    "opaque rectangle (CorruptEncoder pastes an object cut out by its alpha "
                    "mask: give an RGBA PNG)", path)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass
class LoadReport:
    """Which inputs made it into a bank: ``kept`` indices into the input list and the skipped
    files with their errors."""

    kept: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class ImageBank:
    """uint8 images ``N×3×S×S`` (a tensor on any device, or a memory-mapped array)."""

    def __init__(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"an ImageBank holds uint8 N×3×S×S images, got {shape}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageBank:
        return ImageBank(self.images.to(device))

    def batch(self, index: torch.Tensor | Sequence[int] | slice,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The selected images, uint8, on ``device`` (default: the bank's)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
            if self.images.device.type == "cpu":
                index = index.cpu()
        out = self.images[index]
        return out if device is None else out.to(device, non_blocking=True)

    def chunks(self, chunk: int, device: torch.device | str | None = None, pin: bool = False
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, uint8 chunk)`` over the bank; ``pin`` page-locks host chunks first."""
        for start in range(0, len(self), chunk):
            part = self.images[start:start + chunk]
            if pin and part.device.type == "cpu" and torch.cuda.is_available():
                part = part.pin_memory()
            yield start, part if device is None else part.to(device, non_blocking=True)

    def save(self, path: str | Path, chunk: int = 4096) -> Path:
        """Write a ``.npy`` file, ``chunk`` images at a time (reload with
        ``ImageBank.load(path, mmap=True)``)."""
        path = Path(path)
        with atomic_path(path) as partial:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                            shape=tuple(self.images.shape))
            for start, part in self.chunks(chunk):
                out[start:start + part.shape[0]] = part.cpu().numpy()
            out.flush()
            del out
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> ImageBank:
        # copy-on-write: the tensor is writable, the file is never modified
        return cls(torch.from_numpy(np.load(path, mmap_mode="c" if mmap else None)))

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], size: int, *, crop_ratio: float = 224 / 256,
                   skip_bad: bool = False, cache: str | Path | None = None,
                   verbose: bool = True, workers: int | None = None
                   ) -> tuple[ImageBank, LoadReport]:
        """Read image files through the eval transform. A bad file raises ``ImageReadError``
        naming it, unless ``skip_bad`` (then it is left out and listed in the report, and a
        warning says how many). With ``cache``, the bank is written to / memory-mapped from that
        ``.npy``, beside a ``.json`` manifest of what it was built from (the files' paths, sizes
        and modification times, ``size``, ``crop_ratio``, the report); it is reused only when
        the manifest matches, so a changed file list or image rebuilds it. ``workers`` threads
        decode the files (default: the CPU count, at most 8); the bank keeps the list's order.
        In a ``torch.distributed`` world with ``cache`` (on a filesystem every rank sees), each
        rank reads its shard of the files into the one cache rank 0 creates
        (``_read_shared``); every rank must call this."""
        if not paths:
            raise ValueError("no image paths given")
        manifest = None
        if cache is not None:
            manifest = {"size": size, "crop_ratio": crop_ratio, "files": _files_key(paths)}
            # rank 0 decides; the others map the cache only once it is known to be usable
            reused = _reuse_cache(Path(cache), manifest, skip_bad) if world().main else None
            if broadcast_object(reused is not None):
                return reused or _reuse_cache(Path(cache), manifest, skip_bad)
            if world().size > 1:
                return _read_shared(paths, size, crop_ratio, skip_bad, Path(cache), manifest,
                                    verbose, workers)
        shape = (len(paths), 3, size, size)
        if cache is None:
            images, report = _read_into(torch.empty(shape, dtype=torch.uint8), paths, size,
                                        crop_ratio, skip_bad, verbose, workers)
            return cls(images), report
        cache = Path(cache)  # written straight to disk: the bank need not fit in memory
        _manifest_path(cache).unlink(missing_ok=True)  # no manifest for a half-written bank
        partial = scratch_file(cache)
        try:
            target = torch.from_numpy(np.lib.format.open_memmap(partial, mode="w+",
                                                                dtype=np.uint8, shape=shape))
            images, report = _read_into(target, paths, size, crop_ratio, skip_bad, verbose,
                                        workers)
            if report.skipped:  # the kept rows, compacted into a file of their own
                cls(images).save(cache)
            del images, target
            if not report.skipped:
                os.replace(partial, cache)
        finally:
            partial.unlink(missing_ok=True)
        manifest.update(kept=report.kept, skipped=report.skipped)
        write_text_atomically(json.dumps(manifest), _manifest_path(cache))
        return cls.load(cache), report


def _read_shared(paths: Sequence[str | Path], size: int, crop_ratio: float, skip_bad: bool,
                 cache: Path, manifest: dict, verbose: bool, workers: int | None
                 ) -> tuple[ImageBank, LoadReport]:
    """``ImageBank.from_files`` with the reading split over the ranks: rank 0 creates the
    memory-mapped file, each rank fills the rows of its shard of ``paths`` (kept rows first
    within the shard), rank 0 compacts out skipped files, renames it over ``cache`` and writes
    the manifest; then every rank maps it. A bad file on any rank raises on every rank."""
    shape = (len(paths), 3, size, size)
    partial = None
    if world().main:
        _manifest_path(cache).unlink(missing_ok=True)
        partial = scratch_file(cache)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
    partial = Path(broadcast_object(partial))
    rows = shard(len(paths))
    try:
        target = torch.from_numpy(np.lib.format.open_memmap(partial, mode="r+"))
        error, kept, skipped = None, [], []
        try:
            _, report = _read_into(target[rows.start:rows.stop], paths[rows.start:rows.stop],
                                   size, crop_ratio, skip_bad, verbose, workers,
                                   allow_empty=True)
            kept, skipped = [rows.start + i for i in report.kept], report.skipped
        except ImageReadError as failure:
            error = (failure.path, failure.reason)  # picklable: travels to every rank
        del target
        reports = gather_objects((rows.start, error, kept, skipped))
        failures = [failure for _, failure, _, _ in reports if failure is not None]
        if failures:
            raise ImageReadError(*failures[0])
        report = LoadReport(kept=[i for _, _, part, _ in reports for i in part],
                            skipped=[s for _, _, _, part in reports for s in part])
        if not report.kept:
            raise ValueError("none of the images could be read")
        if world().main:
            if report.skipped:  # each shard's kept rows, compacted into a file of their own
                filled = torch.from_numpy(np.load(partial, mmap_mode="r"))
                rows_kept = torch.cat([torch.arange(start, start + len(part))
                                       for start, _, part, _ in reports])
                ImageBank(filled[rows_kept]).save(cache)
                del filled
                log.warning("skipped %d unreadable image(s), e.g. %s", len(report.skipped),
                            report.skipped[0][0])
            else:
                os.replace(partial, cache)
            manifest.update(kept=report.kept, skipped=report.skipped)
            write_text_atomically(json.dumps(manifest), _manifest_path(cache))
        barrier()
    finally:
        if world().main:
            partial.unlink(missing_ok=True)
    return ImageBank.load(cache), report


def _read_into(target: torch.Tensor, paths: Sequence[str | Path], size: int, crop_ratio: float,
               skip_bad: bool, verbose: bool, workers: int | None, allow_empty: bool = False
               ) -> tuple[torch.Tensor, LoadReport]:
    """Read ``paths`` into the rows of uint8 ``target`` (``len(paths)×3×size×size``), bad
    files skipped with ``skip_bad`` (else their ``ImageReadError`` raised; a warning says how
    many were, unless ``allow_empty``: a shard, whose caller sums up). Returns the filled rows
    and the report; none kept raises unless ``allow_empty``."""
    report = LoadReport()
    workers = workers or min(8, os.cpu_count() or 1)
    with closing(_ordered_reads(list(paths), size, crop_ratio, workers)) as reads:
        for i, (path, image) in enumerate(tqdm(reads, total=len(paths),
                                               desc="reading images", disable=not verbose)):
            if isinstance(image, ImageReadError):
                if not skip_bad:
                    raise image
                report.skipped.append((str(path), str(image)))
            else:
                target[len(report.kept)] = image
                report.kept.append(i)
    if allow_empty:
        return target[:len(report.kept)], report
    if report.skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(report.skipped),
                    report.skipped[0][0])
    if not report.kept:
        raise ValueError("none of the images could be read")
    return target[:len(report.kept)], report


def _read(paths: list[str | Path], size: int, crop_ratio: float
          ) -> list[torch.Tensor | ImageReadError]:
    out: list[torch.Tensor | ImageReadError] = []
    for path in paths:
        try:
            out.append(load_image(path, size, crop_ratio))
        except ImageReadError as exc:
            out.append(exc)
    return out


def _ordered_reads(paths: list[str | Path], size: int, crop_ratio: float, workers: int,
                   per_task: int = 16, parallel_above_s: float = 1e-3
                   ) -> Iterator[tuple[str | Path, torch.Tensor | ImageReadError]]:
    """``(path, image or its ImageReadError)`` in the list's order, ``per_task`` files per task.
    The first task is timed: when a file takes longer than ``parallel_above_s`` (decoding
    dominates, and PIL releases the GIL for it) the rest go to ``workers`` threads, at most
    ``64·workers`` tasks in flight; otherwise they are read in this thread (measured on two
    cores: 800 ImageNet-sized JPEGs 2.8 → 1.3–1.6 s with two threads, but 5,000 32-px PNGs
    0.6 → 1.3 s, the threads fighting over the GIL)."""
    tasks = [paths[i:i + per_task] for i in range(0, len(paths), per_task)]
    if not tasks:
        return
    start = time.perf_counter()
    first = _read(tasks[0], size, crop_ratio)
    yield from zip(tasks[0], first, strict=True)
    slow = (time.perf_counter() - start) / len(tasks[0]) > parallel_above_s
    if workers == 1 or not slow:
        for task in tasks[1:]:
            yield from zip(task, _read(task, size, crop_ratio), strict=True)
        return
    window = 64 * workers
    with ThreadPoolExecutor(workers) as pool:
        for begin in range(1, len(tasks), window):
            part = tasks[begin:begin + window]
            for names, images in zip(part, pool.map(_read, part, repeat(size),
                                                    repeat(crop_ratio)), strict=True):
                yield from zip(names, images, strict=True)


class HostRows:
    """uint8 images ``N×3×S×S`` left in host memory (e.g. a memory-mapped bank larger than the
    device's memory) and read like a device tensor: indexing with a slice, an int64 index
    tensor (on any device) or an int returns those rows copied to ``device``. It has ``shape``,
    ``dtype``, ``ndim`` and ``device`` (the compute device), and nothing else of a tensor, so
    code that would read the whole bank at once fails instead of copying it."""

    def __init__(self, images: torch.Tensor, device: torch.device | str) -> None:
        self.images = images
        self.device = torch.device(device)
        self.shape, self.dtype, self.ndim = images.shape, images.dtype, images.ndim

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return self.images[index].to(self.device)  # used at once: pinning would buy no overlap


BANK_PLACEMENTS = ("auto", "device", "host")


def bank_placement(images: torch.Tensor, device: torch.device | str, placement: str = "auto",
                   free_bytes: int | None = None, max_fraction: float = 0.5) -> str:
    """Where ``place_images`` keeps uint8 ``N×3×S×S`` images: ``"device"`` or ``"host"``.
    ``"auto"``: on the device when they are already there, or take at most ``max_fraction`` of
    its free memory (``free_bytes``, default: what CUDA reports; a CPU has no limit)."""
    if placement not in BANK_PLACEMENTS:
        raise ValueError(f"bank placement must be one of {', '.join(BANK_PLACEMENTS)}, got "
                         f"{placement!r}")
    device = torch.device(device)
    if placement != "auto":
        return placement
    if images.device == device:
        return "device"
    if free_bytes is None:
        if device.type != "cuda":
            return "device"
        free_bytes = torch.cuda.mem_get_info(device)[0]
    nbytes = images.numel() * images.element_size()
    if nbytes <= max_fraction * free_bytes:
        return "device"
    log.info("the images (%.1f GB) exceed %.0f %% of the device's free memory (%.1f GB): they "
             "stay in host memory and are copied in per batch", nbytes / 1e9,
             100 * max_fraction, free_bytes / 1e9)
    return "host"


def place_images(images: torch.Tensor, device: torch.device | str, placement: str = "auto"
                 ) -> torch.Tensor | HostRows:
    """uint8 ``N×3×S×S`` images where a detector reads them (``bank_placement``): moved to
    ``device``, or left in host memory behind ``HostRows``."""
    if bank_placement(images, device, placement) == "device":
        return images.to(device)
    return HostRows(images.cpu(), device)


def remove_cache(cache: str | Path) -> None:
    """Delete a bank cache ``ImageBank.from_files`` wrote (the ``.npy`` and its manifest);
    nothing happens when there is none."""
    _manifest_path(cache).unlink(missing_ok=True)
    Path(cache).unlink(missing_ok=True)


def _manifest_path(cache: str | Path) -> Path:
    return Path(cache).with_suffix(".json")


def _files_key(paths: Sequence[str | Path]) -> str:
    """A hash of each file's absolute path, byte size and modification time (missing files
    count as such)."""
    digest = hashlib.sha1()
    for path in paths:
        path = Path(path).absolute()
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _reuse_cache(cache: Path, manifest: dict, skip_bad: bool
                 ) -> tuple[ImageBank, LoadReport] | None:
    """The cached bank and its report when ``cache`` was built from what ``manifest`` says
    (and, if it skipped files, ``skip_bad`` allows that); otherwise None, logged."""
    if not cache.is_file():
        return None
    try:
        saved = json.loads(_manifest_path(cache).read_text())
    except (OSError, ValueError):
        saved = {}
    same = all(saved.get(key) == value for key, value in manifest.items())
    if not same or (saved.get("skipped") and not skip_bad):
        log.warning("image cache %s was built from other files or settings; rebuilding", cache)
        return None
    report = LoadReport(kept=saved["kept"], skipped=[tuple(s) for s in saved["skipped"]])
    if report.skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s (cached)", len(report.skipped),
                    report.skipped[0][0])
    return ImageBank.load(cache), report

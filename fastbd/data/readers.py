"""Readers and writers for the formats other tools use.

* File lists: one ``<path> <int label>`` per line (PatchSearch / SSL-Backdoor); relative paths
  resolve against ``root`` (default: the list's folder).
* ImageFolder trees: ``root/<class>/<image>``; classes sorted by name.
* CSV pairs: CleanCLIP's comma-separated ``image,caption`` with paths relative to the CSV, or
  open_clip's tab-separated ``filepath,title`` (separator and column names configurable).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass
class FileList:
    """Parsed file list: absolute ``paths``, int ``labels``, and the original ``lines`` (so a
    filtered list can be written back in the input's own format)."""

    paths: list[Path]
    labels: list[int]
    lines: list[str]


def read_file_list(path: str | Path, root: str | Path | None = None) -> FileList:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file list not found: {path}")
    base = Path(root) if root is not None else path.parent
    paths, labels, lines = [], [], []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.rpartition(" ")
        if not name:
            raise ValueError(f"{path}:{number}: expected '<path> <label>', got {line!r}")
        try:
            labels.append(int(label))
        except ValueError:
            raise ValueError(f"{path}:{number}: label {label!r} is not an integer") from None
        file = Path(name)
        paths.append(file if file.is_absolute() else base / file)
        lines.append(raw)
    if not paths:
        raise ValueError(f"file list {path} has no entries")
    return FileList(paths, labels, lines)


def write_file_list(path: str | Path, entries: list[tuple[str, int]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {label}\n" for p, label in entries))
    return path


def read_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Paths, labels and class names of an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(file)
                labels.append(label)
    if not paths:
        raise ValueError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, classes


@dataclass
class CSVPairs:
    paths: list[Path]
    captions: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)


def read_csv_pairs(path: str | Path, *, image_key: str = "image", caption_key: str = "caption",
                   separator: str = ",", root: str | Path | None = None) -> CSVPairs:
    """Pairs from a CSV/TSV with a header; other columns (e.g. ``is_backdoor``) are kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {path}")
    base = Path(root) if root is not None else path.parent
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        fields = reader.fieldnames or []
        for key in (image_key, caption_key):
            if key not in fields:
                raise ValueError(f"{path}: no column {key!r} (columns: {fields}); set "
                                 "image_key/caption_key/separator")
        rows = list(reader)
    if not rows:
        raise ValueError(f"CSV {path} has no rows")
    paths = [Path(r[image_key]) if Path(r[image_key]).is_absolute() else base / r[image_key]
             for r in rows]
    others = {k: [r[k] for r in rows] for k in fields if k not in (image_key, caption_key)}
    return CSVPairs(paths, [r[caption_key] for r in rows], others)


def write_csv_pairs(path: str | Path, rows: list[dict[str, object]], *, separator: str = ","
                    ) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=separator)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 ``3×H×W`` → PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)


def export_images(directory: str | Path, images: torch.Tensor, labels: torch.Tensor,
                  poison_mask: torch.Tensor | None = None, captions: list[str] | None = None,
                  name: str = "train") -> dict[str, Path]:
    """Write PNGs plus a file list ``<name>.txt`` (relative paths; poisoned files carry
    ``HTBA_trigger`` in their name, the PatchSearch ground-truth convention) and, with
    captions, a CleanCLIP CSV ``<name>.csv`` (``image,caption,label,is_backdoor``)."""
    directory = Path(directory)
    entries, rows = [], []
    for i in range(images.shape[0]):
        poisoned = bool(poison_mask[i]) if poison_mask is not None else False
        relative = f"{name}/{i:06d}{'_HTBA_trigger' if poisoned else ''}.png"
        save_png(images[i], directory / relative)
        entries.append((relative, int(labels[i])))
        if captions is not None:
            rows.append({"image": relative, "caption": captions[i], "label": int(labels[i]),
                         "is_backdoor": int(poisoned)})
    written = {"file_list": write_file_list(directory / f"{name}.txt", entries)}
    if captions is not None:
        written["csv"] = write_csv_pairs(directory / f"{name}.csv", rows)
    return written

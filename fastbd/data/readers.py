"""Readers and writers for the formats other tools use.

* File lists: one ``<path> <int label>`` per line (PatchSearch / SSL-Backdoor); relative paths
  resolve against ``root`` (default: the list's folder).
* ImageFolder trees: ``root/<class>/<image>``; classes sorted by name.
* CSV pairs: CleanCLIP's comma-separated ``image,caption`` with paths relative to the CSV, or
  open_clip's tab-separated ``filepath,title`` (separator and column names configurable).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from fastbd.storage import atomic_output, output_dir, read_text_file, write_text_atomically

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass
class FileList:
    """Parsed file list: absolute ``paths``, int ``labels``, and the original ``lines`` (so a
    filtered list can be written back in the input's own format)."""

    paths: list[Path]
    labels: list[int]
    lines: list[str]


def read_file_list(path: str | Path, root: str | Path | None = None, *,
                   duplicates: str = "warn") -> FileList:
    """Parse a ``<path> <label>`` list (labels: non-negative integers; ``#`` comments and blank
    lines skipped). ``duplicates``: a path listed twice is logged (``warn``), refused
    (``refuse``: ``ValueError`` naming both lines) or accepted silently (``allow``)."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got "
                         f"{duplicates!r}")
    path = Path(path)
    text = read_text_file(path, "file list")
    base = Path(root) if root is not None else path.parent
    paths, labels, lines, first_line = [], [], [], {}
    repeated: list[tuple[int, int, Path]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.rpartition(" ")
        if not name:
            raise ValueError(f"{path}:{number}: expected '<path> <label>', got {line!r}")
        value = class_index(label, f"{path}:{number}: label")
        file = Path(name)
        file = file if file.is_absolute() else base / file
        if file in first_line:
            repeated.append((first_line[file], number, file))
        else:
            first_line[file] = number
        labels.append(value)
        paths.append(file)
        lines.append(raw)
    if not paths:
        raise ValueError(f"file list {path} has no entries")
    _report_duplicates(path, repeated, duplicates, "path")
    return FileList(paths, labels, lines)


DUPLICATE_POLICIES = ("warn", "refuse", "allow")

MAX_CLASSES = 2**24
"""More classes than any labelled data set has (ImageNet-21k: 21,841); a larger label is a
corrupt field, refused where it is read rather than overflowing an int64 tensor later."""


def class_index(text: str, what: str) -> int:
    """``text`` as a class index in ``[0, MAX_CLASSES)``; ``ValueError`` naming ``what`` (the
    file, line and field) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{what} {value} is negative (labels are class indices 0, 1, …)")
    if value >= MAX_CLASSES:
        raise ValueError(f"{what} {text.strip()} is not a class index (at most "
                         f"{MAX_CLASSES - 1:,})")
    return value


def _report_duplicates(path: Path, repeated: list[tuple[int, int, object]], policy: str,
                       what: str) -> None:
    """Warn about or refuse the ``(first line, repeated line, entry)`` duplicates of ``path``."""
    if not repeated or policy == "allow":
        return
    first, again, entry = repeated[0]
    message = (f"{path}: {len(repeated)} duplicate {what}(s), e.g. line {again} repeats line "
               f"{first} ({entry})")
    if policy == "refuse":
        raise ValueError(message)
    log.warning("%s; each copy counts as an image of its own (refuse with --refuse-duplicates)",
                message)


TRIGGER_MARKER = "HTBA_trigger"
"""What poisoned files carry in their names in the PatchSearch / SSL-Backdoor convention (and in
``export_images``' output with ``marker_names``)."""
TRUTH_SUFFIX = ".poisoned.npy"
"""The ground-truth file ``export_images`` writes beside a file list ``<name>.txt``:
``<name>.poisoned.npy``, N booleans in the list's order (for metrics, never for a defense)."""


def truth_beside(file_list: str | Path) -> Path:
    """Where ``export_images`` puts the ground truth of ``file_list`` (``TRUTH_SUFFIX``)."""
    file_list = Path(file_list)
    return file_list.with_name(file_list.stem + TRUTH_SUFFIX)


def names_ground_truth(paths: list[Path] | list[str], marker: str = TRIGGER_MARKER
                       ) -> torch.Tensor | None:
    """bool ``N``: which ``paths`` name a poisoned file (``marker`` in the path); None when none
    does (the list carries no ground truth)."""
    truth = torch.tensor([marker in str(p) for p in paths], dtype=torch.bool)
    return truth if bool(truth.any()) else None


def read_ground_truth(path: str | Path, n: int) -> torch.Tensor:
    """bool ``N`` ground truth from a file: a ``.npy`` of ``N`` booleans (or 0/1), a ``.npy`` of
    int indices of the poisoned images, or a text file with one index per line (``#``
    comments allowed) or one 0/1 flag per image (``N`` lines of 0 and 1 with a value
    repeated; ``N`` ≤ 2 lines of distinct 0/1 could be either and are refused). An index
    listed twice is refused. Raises ``ValueError`` naming the file (and line)."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"ground truth {path} is not a readable .npy ({error})") from None
        array = torch.from_numpy(np.asarray(values))
        if array.ndim == 1 and array.numel() == n and (
                array.dtype == torch.bool or bool(((array == 0) | (array == 1)).all())):
            return array.bool()
        if array.ndim != 1 or array.dtype.is_floating_point or array.dtype == torch.bool:
            raise ValueError(f"ground truth {path}: expected {n} booleans or int indices, got "
                             f"{array.dtype} of shape {tuple(array.shape)}")
        indices = array.long()
    else:
        numbers, first_line = [], {}
        repeated = None
        for number, line in enumerate(read_text_file(path, "ground truth").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                value = int(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: {line!r} is not an image index") from None
            if value in first_line and repeated is None:
                repeated = (first_line[value], number, value)
            first_line.setdefault(value, number)
            numbers.append(value)
        if len(numbers) == n and set(numbers) <= {0, 1}:
            if repeated is not None:
                return torch.tensor(numbers, dtype=torch.bool)
            raise ValueError(f"ground truth {path}: {n} line(s) of distinct 0/1 could be flags "
                             "or indices; give a .npy of booleans or of indices")
        if repeated is not None:
            first, again, value = repeated
            raise ValueError(f"{path}:{again}: index {value} is listed again (line {first}); "
                             f"a ground-truth file holds one index per poisoned image or one "
                             f"0/1 flag per image ({n} lines)")
        outside = next((v for v in numbers if not 0 <= v < n), None)
        if outside is not None:
            raise ValueError(f"{path}:{first_line[outside]}: index {outside} is not in "
                             f"[0, {n})")
        indices = torch.tensor(numbers, dtype=torch.long)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"ground truth {path}: indices must be in [0, {n}), got "
                         f"{int(indices.min())}..{int(indices.max())}")
    truth = torch.zeros(n, dtype=torch.bool)
    truth[indices] = True
    return truth


def read_lines(path: str | Path, what: str = "list") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (``#`` comments skipped); an empty
    file raises ``ValueError`` naming it."""
    text = read_text_file(Path(path), what)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what} {path} is empty")
    return lines


def write_file_list(path: str | Path, entries: list[tuple[str, int]]) -> Path:
    return write_text_atomically("".join(f"{p} {label}\n" for p, label in entries), path)


def read_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Paths, labels and class names of an ImageFolder tree. A path with a line break in a
    name is refused (``ValueError`` naming it): the file lists fastbd writes (``filtered.txt``)
    hold one path per line, and such a name would span two."""
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
                if "\n" in str(file) or "\r" in str(file):
                    raise ValueError(f"{root}: {str(file)!r} has a line break in its name, "
                                     "which no file list can hold; rename it")
                paths.append(file)
                labels.append(label)
    if not paths:
        raise ValueError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, classes


@dataclass
class CSVPairs:
    """Image ``paths`` (absolute or relative to the CSV's folder), ``captions``, the other
    ``columns`` by name, and the CSV ``line`` each row ends on (for messages)."""

    paths: list[Path]
    captions: list[str] | None
    columns: dict[str, list[str]] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)


def read_csv_pairs(path: str | Path, *, image_key: str = "image", caption_key: str = "caption",
                   separator: str = ",", root: str | Path | None = None,
                   duplicates: str = "warn", captions_required: bool = True) -> CSVPairs:
    """Pairs from a CSV/TSV with a header (UTF-8, a byte-order mark allowed); other columns
    (e.g. ``is_backdoor``) are kept. A row with fewer or more fields than the header, or an
    empty image path, raises ``ValueError`` naming the file and line. ``duplicates``: rows
    with the same image and caption are logged (``warn``), refused (``refuse``) or accepted
    (``allow``) — the same image with other captions is normal (COCO-style data). Without
    ``captions_required`` a CSV with no ``caption_key`` column gives ``captions`` None."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got "
                         f"{duplicates!r}")
    path = Path(path)
    text = read_text_file(path, "CSV")
    base = Path(root) if root is not None else path.parent
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator)
        fields = reader.fieldnames or []
        if not captions_required and caption_key not in fields:
            caption_key = None
        for key in (image_key, caption_key):
            if key is not None and key not in fields:
                raise ValueError(f"{path}: no column {key!r} (columns: {fields}); name the "
                                 "columns with --image-key/--caption-key/--separator (in "
                                 "Python: image_key=, caption_key=, separator=)")
        rows, numbers = [], []
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: {len(fields) + len(row[None])} "
                                 f"fields, the header has {len(fields)} (quote a caption that "
                                 f"holds the separator {separator!r})")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise ValueError(f"{path}:{reader.line_num}: row lacks the field(s) "
                                 f"{', '.join(missing)} (the header has {len(fields)})")
            if not row[image_key].strip():
                raise ValueError(f"{path}:{reader.line_num}: empty {image_key!r}")
            rows.append(row)
            numbers.append(reader.line_num)
    except csv.Error as error:
        raise ValueError(f"{path}: not a valid CSV ({error})") from None
    if not rows:
        raise ValueError(f"CSV {path} has no rows")
    paths = [Path(r[image_key]) if Path(r[image_key]).is_absolute() else base / r[image_key]
             for r in rows]
    seen: dict[tuple[Path, str], int] = {}
    repeated = []
    for number, file, row in zip(numbers, paths, rows, strict=True):
        key = (file, row[caption_key] if caption_key is not None else "")
        if key in seen:
            repeated.append((seen[key], number, file))
        else:
            seen[key] = number
    _report_duplicates(path, repeated, duplicates, "image-caption pair")
    others = {k: [r[k] for r in rows] for k in fields if k not in (image_key, caption_key)}
    captions = None if caption_key is None else [r[caption_key] for r in rows]
    return CSVPairs(paths, captions, others, numbers)


def csv_labels(path: str | Path, pairs: CSVPairs, column: str = "label") -> list[int]:
    """The integer class labels of ``pairs`` from its ``column``; a CSV without the column, or
    a value that is not a class index, raises ``ValueError`` naming the file (and row)."""
    values = pairs.columns.get(column)
    if values is None:
        raise ValueError(f"{path}: no column {column!r} of class indices (columns: "
                         f"{sorted(pairs.columns)} besides the image and caption)")
    return [class_index(value, f"{path}:{line}: {column}")
            for line, value in zip(pairs.lines, values, strict=True)]


def write_csv_pairs(path: str | Path, rows: list[dict[str, object]], *, separator: str = ","
                    ) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter=separator)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomically(text.getvalue(), path)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 ``3×H×W`` → PNG (through ``atomic_output``)."""
    with atomic_output(path) as handle:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(handle, format="PNG")


def export_images(directory: str | Path, images: torch.Tensor, labels: torch.Tensor,
                  poison_mask: torch.Tensor | None = None, captions: list[str] | None = None,
                  name: str = "train", absolute: bool = False, marker_names: bool = False
                  ) -> dict[str, Path]:
    """Write PNGs ``<name>/NNNNNN.png`` plus a file list ``<name>.txt`` (paths relative to
    ``directory``, or absolute with ``absolute``), with ``poison_mask`` its ground truth
    ``<name>.poisoned.npy`` (``truth_beside``) and, with captions, a CleanCLIP CSV
    ``<name>.csv`` (``image,caption,label,is_backdoor``). A file's name says nothing of its
    poison unless ``marker_names``: then poisoned files are ``NNNNNN_HTBA_trigger.png``
    (``TRIGGER_MARKER``, the PatchSearch convention its official scripts read). Returns the
    paths written: ``file_list``, ``truth`` (with a mask), ``csv`` (with captions) and
    ``images`` (a list)."""
    directory = Path(directory)
    output_dir(directory, name)
    entries, rows = [], []
    for i in range(images.shape[0]):
        poisoned = bool(poison_mask[i]) if poison_mask is not None else False
        marked = poisoned and marker_names
        relative = f"{name}/{i:06d}{'_' + TRIGGER_MARKER if marked else ''}.png"
        save_png(images[i], directory / relative)
        listed = str((directory / relative).resolve()) if absolute else relative
        entries.append((listed, int(labels[i])))
        if captions is not None:
            rows.append({"image": listed, "caption": captions[i], "label": int(labels[i]),
                         "is_backdoor": int(poisoned)})
    written = {"file_list": write_file_list(directory / f"{name}.txt", entries),
               "images": [directory / relative for relative, _ in entries]}
    if poison_mask is not None:
        import numpy as np

        written["truth"] = truth_beside(written["file_list"])
        with atomic_output(written["truth"]) as handle:
            np.save(handle, poison_mask.bool().cpu().numpy(), allow_pickle=False)
    if captions is not None:
        written["csv"] = write_csv_pairs(directory / f"{name}.csv", rows)
    return written

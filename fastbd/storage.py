"""Reading and writing fastbd's files safely.

* Every write goes to a fresh temporary name in the target's folder (created exclusively, so it
  never writes through an existing file or a planted symbolic link) and is renamed over the
  target when complete: an interruption leaves the previous file or the new one, never half of
  one.
* ``output_dir`` creates a folder below an output root, refusing a symbolic link below the root
  (a link planted in ``--out`` would redirect fastbd's writes out of it).
* ``ResultFiles`` writes a result's files and a ``manifest.json`` last; a new result in the same
  folder first removes the files the previous manifest lists, so an older result never sits
  beside a newer one looking current.
* ``read_text_file`` reads a text input (config, file list, CSV) as UTF-8, naming the file and
  line of what is wrong; ``load_torch`` reads any ``.pt`` file with ``weights_only=True``
  (tensors, numbers, strings and containers only: a pickle planted in an output folder cannot
  run code) and turns every failure into a ``ValueError`` naming the file.
* ``TrainingState`` / ``StageFiles``: training state an interrupted run continues from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from fastbd.distributed import world

log = logging.getLogger(__name__)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
"""Permissions of the files fastbd writes: what ``open`` would give under this process's umask
(temporary files are created 0600)."""


def scratch_file(path: str | Path) -> Path:
    """A fresh, empty temporary file beside ``path`` (its folder created if missing), created
    exclusively — never an existing file or link — with the permissions ``open`` would give.
    The caller renames it over ``path`` or deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, FILE_MODE)
    finally:
        os.close(descriptor)
    return Path(name)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A ``scratch_file`` to be written by name (e.g. as a memory map); when the block ends
    without an error it is renamed over ``path`` — replacing a file or a symbolic link at
    ``path``, never writing through it. On an error it is deleted and ``path`` is untouched."""
    temporary = scratch_file(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object that becomes ``path`` when the block ends without an error
    (``atomic_path``)."""
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        yield handle


def save_atomically(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_output``."""
    with atomic_output(path) as handle:
        torch.save(obj, handle)


def write_text_atomically(text: str, path: str | Path) -> Path:
    """UTF-8 ``text`` to ``path`` through ``atomic_output``."""
    with atomic_output(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


def save_array_atomically(array: np.ndarray, path: str | Path) -> Path:
    """``np.save(array)`` to ``path`` through ``atomic_output``."""
    with atomic_output(path) as handle:
        np.save(handle, array)
    return Path(path)


def output_dir(root: str | Path, *parts: str) -> Path:
    """The folder ``root/parts…``, created where missing. ``root`` must be (or become) a writable
    folder; a symbolic link at any of ``parts`` is refused (``ValueError``): fastbd writes only
    inside the output folder it was given."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"output folder {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output folder {root}: {error.strerror}") from None
    folder = root
    for part in parts:
        folder = folder / part
        check_sub_folder(root, folder)
        folder.mkdir(exist_ok=True)
    return folder


def check_sub_folder(root: str | Path, folder: str | Path) -> None:
    """``folder`` (inside the output folder ``root``) can hold a result's files: not a
    symbolic link, not a file (``ValueError`` naming it)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; fastbd writes only inside {root} "
                         "(remove the link)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")


def check_writable_dir(path: str | Path) -> Path:
    """Check, before any long work, that a file can be written into the folder ``path`` — so
    that hours of training do not end in a failed save — by creating one there (and the missing
    folders on the way, which are removed again: a failed check leaves nothing behind). Raises
    ``ValueError`` naming the folder."""
    folder = Path(path)
    missing = []
    ancestor = folder
    while not ancestor.exists() and not ancestor.is_symlink():
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"output folder {folder} is a file, not a folder" if ancestor == folder
                         else f"cannot create output folder {folder}: {ancestor} is a file")
    created = []
    try:
        for part in reversed(missing):
            part.mkdir()
            created.append(part)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"output folder {folder} is not writable: {error.strerror}") from None
    finally:
        for part in reversed(created):
            part.rmdir()
    return folder


MANIFEST = "manifest.json"


class ResultFiles:
    """Writes one result's files into ``directory`` (the output root): each one atomically, and
    ``manifest.json`` last, listing them with a run id — a folder holds a complete result exactly
    when its manifest exists. Opening a ``ResultFiles`` first removes the files of the result
    the folder held before (``remove_result``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = output_dir(directory)
        remove_result(self.directory)
        self.files: list[str] = []

    def path(self, name: str) -> Path:
        """``directory/name`` (``name`` may hold sub-folders), recorded in the manifest; write it
        through ``atomic_output`` or the helpers below."""
        *folders, _ = Path(name).parts
        output_dir(self.directory, *folders)
        self.files.append(name)
        return self.directory / name

    def record(self, names) -> None:
        """Add files written by other code (names relative to the folder) to the manifest."""
        self.files.extend(names)

    def text(self, name: str, text: str) -> Path:
        return write_text_atomically(text, self.path(name))

    def json(self, name: str, payload: object) -> Path:
        return self.text(name, json.dumps(payload, indent=2, default=str))

    def array(self, name: str, array: np.ndarray) -> Path:
        return save_array_atomically(array, self.path(name))

    def torch(self, name: str, obj: object) -> Path:
        path = self.path(name)
        save_atomically(obj, path)
        return path

    def close(self) -> Path:
        """Write the manifest (the result is complete)."""
        manifest = {"files": self.files, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return write_text_atomically(json.dumps(manifest, indent=2), self.directory / MANIFEST)


def remove_result(directory: str | Path) -> list[str]:
    """Delete the files a previous result's ``manifest.json`` in ``directory`` lists, then the
    manifest (first, so a half-removed result never looks complete). Names that would leave the
    folder (absolute, ``..``, or through a symbolic link) are ignored. Returns the names
    removed."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        return []
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        names = []
    manifest.unlink()
    removed = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            continue
        folders = [directory.joinpath(*Path(name).parts[:i])
                   for i in range(1, len(Path(name).parts))]
        if any(folder.is_symlink() for folder in folders):
            continue  # a planted link: the file behind it is not ours to delete
        target = directory / name
        if target.is_file() or target.is_symlink():
            target.unlink()
            removed.append(name)
    if removed:
        log.info("removed the %d files of the previous result in %s", len(removed), directory)
    return removed


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped). A missing file raises
    ``FileNotFoundError``; a folder, an unreadable file or bytes that are not UTF-8 raise
    ``ValueError`` naming ``what``, the file and (for bad bytes) the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: {what} is not UTF-8 text (byte "
                         f"0x{raw[error.start]:02x})") from None


def load_torch(path: str | Path, what: str = "file", map_location: str | torch.device = "cpu"
               ) -> object:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only —
    a file holding any other Python object is refused, so loading never runs code. Every
    failure (missing, a folder, empty, truncated, not a torch file, other objects) raises
    ``ValueError`` (``FileNotFoundError`` when missing) naming ``what`` and the file."""
    import argparse

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    try:
        # argparse.Namespace: the training arguments some published checkpoints carry
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise ValueError(f"{what} {path} holds Python objects other than tensors and "
                         f"containers; refused, since loading it could run code ({first})"
                         ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError,
            UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(
            error).__name__
        raise ValueError(f"{what} {path} is not a readable torch file (truncated or another "
                         f"format: {reason[:160]})") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A model's state dict from a checkpoint file (``load_torch``): a plain state dict, or a
    dict holding one under ``state_dict`` or ``model``; ``module.`` prefixes (DataParallel) are
    kept for the caller to map. Raises ``ValueError`` naming the file when it holds no state
    dict (a list, a bare tensor, a dict without tensors)."""
    state = load_torch(path, "checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = (f"a dict with keys {sorted(map(str, state))[:5]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise ValueError(f"checkpoint {path} holds {kind}, not a state dict of named tensors "
                         "(expected {name: tensor}, or one under 'state_dict' or 'model')")
    return state


def fingerprint(*tensors: torch.Tensor, samples: int = 256) -> str:
    """A short hash of the tensors' shapes, dtypes and up to ``samples`` evenly spaced rows each
    — enough to tell one training set from another without reading a large one whole."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
        if tensor.shape[0]:
            rows = tensor[::max(1, tensor.shape[0] // samples)]
            digest.update(rows.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainingState:
    """A resumable training loop's whole state in one file at ``path`` (None: not kept), so that
    an interrupted run continues exactly where it stopped — every loop in fastbd keeps its state
    through this one helper.

    Progress is counted in completed *units*: the loop's steps or its epochs, whichever it
    resumes at. The run is identified by ``config`` (a dict) and the ``fingerprint`` of its
    ``data`` tensors (taken only when there is a file to check); a file written by another run
    is refused, naming what differs (or ignored: ``restore(refuse_other=False)``). ``modules``,
    ``optimizer``, ``schedule`` (or None), the loop's own ``generators`` and the global CPU (and
    a CUDA ``device``'s) RNG are saved and restored. ``extra``: the loop's own plain values
    (losses, early-stopping history), saved with ``save(..., extra=)`` and set by ``restore``.
    ``seconds``: training time over every run (the clock starts at ``restore``). A ``save``
    sooner than ``save_every_s`` after the previous one is skipped unless it is ``final``.
    ``writer``: whether this process writes (and removes) the file — by default rank 0 of a
    ``torch.distributed`` world, whose ranks train in lock-step and hold the same state; every
    rank reads it."""

    path: str | Path | None
    config: dict
    data: tuple[torch.Tensor, ...]
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    save_every_s: float = 0.0
    writer: bool | None = None

    def __post_init__(self) -> None:
        self.writer = world().main if self.writer is None else self.writer
        self.path = None if self.path is None else Path(self.path)
        self.device = torch.device(self.device)
        self.run = ({"config": self.config, "data": fingerprint(*self.data)}
                    if self.path is not None else {})
        self.extra: dict = {}
        self.seconds_before = 0.0
        self._started = time.perf_counter()
        self._last_save = self._started

    @property
    def seconds(self) -> float:
        """Training seconds so far: those of earlier runs plus this one's since ``restore``."""
        return self.seconds_before + time.perf_counter() - self._started

    def restore(self, *, refuse_other: bool = True) -> int:
        """Load the file if there is one and return the units it had done (0 on a fresh start);
        ``extra`` and ``seconds_before`` are set from it. A file written by another run raises
        ``ValueError`` naming what differs — or, with ``refuse_other=False``, is logged and
        ignored (a fresh start)."""
        self._started = self._last_save = time.perf_counter()
        if self.path is None or not self.path.is_file():
            return 0
        state = load_torch(self.path, "training state", self.device)
        saved_run = state.get("run") if isinstance(state, dict) else None
        if not isinstance(saved_run, dict) or "units_done" not in state:
            raise ValueError(f"{self.path} is not a fastbd training state; remove it to start "
                             "afresh")
        differ = [key for key in self.run if saved_run.get(key) != self.run[key]]
        if differ or saved_run.keys() != self.run.keys():
            what = ", ".join(differ) or "fields"
            if not refuse_other:
                log.info("%s belongs to another training run (its %s differ); starting afresh",
                         self.path, what)
                return 0
            raise ValueError(f"training state {self.path} belongs to another run (its {what} "
                             "differ); remove it to start afresh")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        for name, generator in self.generators.items():
            generator.set_state(state["generators"][name].cpu())
        torch.random.set_rng_state(state["global_rng"]["cpu"].cpu())
        if self.device.type == "cuda" and "cuda" in state["global_rng"]:
            torch.cuda.set_rng_state(state["global_rng"]["cuda"].cpu(), self.device)
        self.extra = state.get("extra", {})
        self.seconds_before = float(state["seconds"])
        return int(state["units_done"])

    def save(self, units_done: int, *, extra: dict | None = None, final: bool = False) -> None:
        """Write the state after ``units_done`` units (atomically; skipped within
        ``save_every_s`` of the previous save unless ``final``)."""
        now = time.perf_counter()
        if self.path is None or not self.writer or (
                not final and now - self._last_save < self.save_every_s):
            return
        global_rng = {"cpu": torch.random.get_rng_state()}
        if self.device.type == "cuda":
            global_rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_atomically({
            "run": self.run, "units_done": units_done, "seconds": self.seconds,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "global_rng": global_rng, "extra": extra or {}}, self.path)
        self._last_save = time.perf_counter()

    def remove(self) -> None:
        """Delete the file (training finished)."""
        if self.path is not None and self.writer:
            self.path.unlink(missing_ok=True)


def module_fingerprint(module: nn.Module) -> str:
    """``fingerprint`` of a module's parameters and buffers (which weights a run started from)."""
    return fingerprint(*(t.detach().reshape(-1) for t in module.state_dict().values()))


@dataclass
class StageFiles:
    """A multi-stage run's saved work in ``directory`` (None: nothing is kept): one file per
    stage, ``<prefix>-<stage>.pt``, tagged with ``run`` (a dict naming the settings and inputs).
    ``load`` returns what a run with the same tag saved and None otherwise (a file from another
    run is logged and later overwritten); ``training_state`` gives a training stage's
    ``TrainingState``, saved at most every ``save_every_s`` seconds and when the stage ends;
    ``existing`` lists the files (a run's result takes the list and deletes them once it is
    saved: until then an interrupted run can still continue from them); ``clear`` deletes
    them."""

    directory: str | Path | None
    prefix: str
    run: dict
    save_every_s: float = 60.0
    resumed_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds earlier runs spent on the stages this run loaded or continued (set by the
    stages' code, added to the result's timings)."""
    writer: bool | None = None
    """Whether this process writes the files (``TrainingState.writer``; default: rank 0)."""

    def path(self, stage: str) -> Path | None:
        if self.directory is None:
            return None
        return Path(self.directory) / f"{self.prefix}-{stage}.pt"

    def load(self, stage: str) -> dict | None:
        path = self.path(stage)
        if path is None or not path.is_file():
            return None
        saved = load_torch(path, "saved stage")
        if not isinstance(saved, dict) or saved.get("run") != self.run:
            log.info("%s was saved by another run; computing it afresh", path)
            return None
        log.info("loaded the %s stage from %s", stage, path)
        return saved["payload"]

    def save(self, stage: str, payload: dict) -> None:
        path = self.path(stage)
        writes = world().main if self.writer is None else self.writer
        if path is not None and writes:
            save_atomically({"run": self.run, "payload": payload}, path)

    def training_state(self, stage: str, modules: dict[str, nn.Module],
                       optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                       device: torch.device) -> tuple[TrainingState, int]:
        """The ``TrainingState`` of training stage ``stage`` (tagged with ``run``, saved at most
        every ``save_every_s``) and the units it had done — its state loaded into ``modules``,
        ``optimizer`` and ``generators``, a state of another run ignored; the seconds earlier
        runs spent go to ``resumed_seconds[stage]``."""
        state = TrainingState(self.path(stage), self.run, (), modules, optimizer, None,
                              generators, device, self.save_every_s, self.writer)
        done = state.restore(refuse_other=False)
        if done:
            log.info("%s: continuing after %d completed units", stage, done)
            self.resumed_seconds[stage] = state.seconds_before
        return state, done

    def existing(self) -> list[Path]:
        """The stage files present now."""
        if self.directory is None:
            return []
        return sorted(Path(self.directory).glob(f"{self.prefix}-*.pt"))

    def clear(self) -> None:
        remove_files(self.existing())


def remove_files(paths: list[Path]) -> None:
    """Delete ``paths`` (those already gone are skipped)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


NO_STAGES = StageFiles(None, "", {})
"""Nothing kept: the stage files of a run without a checkpoint directory."""


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """One line saying how ``state`` fails to fit ``model`` (empty when it fits): how many keys
    are missing, unexpected or of another shape, with up to three examples of each — torch's
    own message lists every key, hundreds for a wrong architecture."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    reshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in own
                if key in state and isinstance(state[key], torch.Tensor)
                and state[key].shape != own[key].shape]
    parts = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}" for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("keys of another shape (checkpoint vs model)", reshaped)) if keys]
    return "; ".join(parts)

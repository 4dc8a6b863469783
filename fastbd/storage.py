"""Writing files so that an interruption never leaves a torn one, and training state that
an interrupted run continues from."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def save_atomically(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to a sibling temporary file, then rename it over ``path``: an
    interruption leaves either the previous file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(obj, partial)
    os.replace(partial, path)


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
class EpochCheckpoint:
    """A training loop's whole state in one file at ``path`` (None: no checkpointing), written
    after each epoch so that an interrupted run can continue exactly where it stopped.

    The run is identified by ``config`` (a dict) and the ``fingerprint`` of its ``data``
    tensors, taken only when there is a file to check; a file written by another run is
    refused, naming what differs. ``schedule`` may be None (a constant learning rate).
    ``generators`` are the loop's own random streams; the global
    CPU (and, on a CUDA ``device``, GPU) RNG is saved too, for modules that draw from it
    (dropout). ``extra`` holds the caller's own state (a dict of plain values): saved with
    ``save(..., extra=)``, set by ``restore`` (empty on a fresh start). ``min_interval_s``: a
    ``save`` sooner than that after the previous one is skipped unless it is ``final`` (for
    loops whose epochs or steps are short)."""

    path: str | Path | None
    config: dict
    data: tuple[torch.Tensor, ...]
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    generators: dict[str, torch.Generator]
    device: torch.device
    min_interval_s: float = 0.0

    def __post_init__(self) -> None:
        self.path = None if self.path is None else Path(self.path)
        self.last_save = time.perf_counter()
        self.run = ({"config": self.config, "data": fingerprint(*self.data)}
                    if self.path is not None else {})
        self.extra: dict = {}

    def restore(self, *, refuse_other: bool = True) -> tuple[list[float], int, float]:
        """Load the file if there is one: (losses so far, epochs done, seconds spent); else
        ``([], 0, 0.0)``. A file written by another run is refused, naming what differs — or,
        with ``refuse_other=False``, logged and ignored (a fresh start)."""
        if self.path is None or not self.path.is_file():
            return [], 0, 0.0
        state = torch.load(self.path, map_location=self.device, weights_only=True)
        differ = [key for key in self.run if state["run"].get(key) != self.run[key]]
        if differ or state["run"].keys() != self.run.keys():
            what = ", ".join(differ) or "fields"
            if not refuse_other:
                log.info("%s belongs to another training run (its %s differ); starting afresh",
                         self.path, what)
                return [], 0, 0.0
            raise ValueError(f"checkpoint {self.path} belongs to another training run (its "
                             f"{what} differ); remove it to start afresh")
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
        return state["losses"], state["epochs_done"], state["seconds"]

    def save(self, losses: list[float], epochs_done: int, seconds: float, *,
             extra: dict | None = None, final: bool = False) -> None:
        if self.path is None or (
                not final and time.perf_counter() - self.last_save < self.min_interval_s):
            return
        global_rng = {"cpu": torch.random.get_rng_state()}
        if self.device.type == "cuda":
            global_rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_atomically({
            "run": self.run, "losses": losses, "epochs_done": epochs_done, "seconds": seconds,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "global_rng": global_rng, "extra": extra or {}}, self.path)
        self.last_save = time.perf_counter()

    def remove(self) -> None:
        """Delete the file (training finished)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def module_fingerprint(module: nn.Module) -> str:
    """``fingerprint`` of a module's parameters and buffers (which weights a run started from)."""
    return fingerprint(*(t.detach().reshape(-1) for t in module.state_dict().values()))


@dataclass
class StageFiles:
    """A multi-stage run's saved work in ``directory`` (None: nothing is kept): one file per
    stage, ``<prefix>-<stage>.pt``, tagged with ``run`` (a dict naming the settings and inputs).
    ``load`` returns what a run with the same tag saved and None otherwise (a file from another
    run is logged and later overwritten); ``path`` gives a training stage's ``EpochCheckpoint``
    file, saved at most every ``save_every_s`` seconds and when the stage ends; ``clear``
    deletes them all once the run's result is saved."""

    directory: str | Path | None
    prefix: str
    run: dict
    save_every_s: float = 60.0

    def path(self, stage: str) -> Path | None:
        if self.directory is None:
            return None
        return Path(self.directory) / f"{self.prefix}-{stage}.pt"

    def load(self, stage: str) -> dict | None:
        path = self.path(stage)
        if path is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("run") != self.run:
            log.info("%s was saved by another run; computing it afresh", path)
            return None
        log.info("loaded the %s stage from %s", stage, path)
        return saved["payload"]

    def save(self, stage: str, payload: dict) -> None:
        path = self.path(stage)
        if path is not None:
            save_atomically({"run": self.run, "payload": payload}, path)

    def clear(self) -> None:
        if self.directory is not None:
            for path in Path(self.directory).glob(f"{self.prefix}-*.pt"):
                path.unlink(missing_ok=True)


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

"""Writing files so that an interruption never leaves a torn one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to a sibling temporary file, then rename it over ``path``: an
    interruption leaves either the previous file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(obj, partial)
    os.replace(partial, path)

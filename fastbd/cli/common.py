"""What the ``fastbd`` commands share: the output folder, the default device, common flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_out(out: str | Path) -> Path:
    """The command's output folder, checked before any work: writable, and emptied of the
    result an earlier run left there (so it never looks like this run's)."""
    from fastbd.storage import check_writable_dir, remove_result

    folder = check_writable_dir(out)
    remove_result(folder)
    return folder


def duplicates_policy(args: argparse.Namespace) -> str:
    """The readers' duplicate policy: ``refuse`` with ``--refuse-duplicates``, else ``warn``."""
    return "refuse" if getattr(args, "refuse_duplicates", False) else "warn"


def add_duplicates_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refuse-duplicates", action="store_true",
                        help="stop when the file list names an image twice (or the CSV repeats "
                             "an image-caption pair); by default a warning says how many")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default_device(),
                        help="torch device to compute on (default: %(default)s)")

"""What the ``fastbd`` commands share: the output folder, the default device, common flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help (none for unset values and off switches); the
    examples in the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, summary: str,
                examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows ``summary``, every default and the ``examples``
    (each a full ``fastbd …`` line; the CLI tests parse every one)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                            formatter_class=HelpFormatter)
    parser.set_defaults(examples=examples)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
                        help="torch device to compute on")

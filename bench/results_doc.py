"""``docs/results.md``: the full result tables, each section written by the script that measures
it (``write_section``), between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` markers, so one
script's rerun replaces its own tables and leaves the others'."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fastbd.storage import write_text_atomically

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
HEADER = ("# Results\n\nEvery table below is written by the script named in its section; rerun "
          "it to refresh the section. The README shows one summary table per defense.\n")


def write_section(name: str, markdown: str, path: Path = RESULTS) -> Path:
    """Replace (or append) section ``name`` of ``path`` with ``markdown``, atomically."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) \
        else f"{text.rstrip()}\n\n{block}\n"
    write_text_atomically(text, path)
    return path


def add_sweep_flags(parser: argparse.ArgumentParser, name: str, jobs: str) -> None:
    """The flags every resumable measuring script takes: ``--jobs`` (``jobs``: what runs at
    once), the threat-model ``--cache``, the ``--json`` its cells are kept in
    (``bench/results/<name>-cpu-amd-epyc.json``), ``--no-docs`` and ``--redo``."""
    parser.add_argument("--jobs", type=int, default=1, help=f"{jobs} run at once")
    parser.add_argument("--cache", default="fastbd-out/cache", help="threat-model cache")
    parser.add_argument("--json", default=f"bench/results/{name}-cpu-amd-epyc.json")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/results.md alone")
    parser.add_argument("--redo", default="", metavar="DEFENSES",
                        help="defenses (comma-separated) measured again where already finished, "
                             "e.g. after a change to them; the others' results are kept")



def look_of(row: dict) -> str:
    """The world look a result row was measured on (rows from before looks: ``default``)."""
    return row.get("look", "default")


def world_label(row: dict) -> str:
    """A row's world column: its seed, prefixed by its look where it is not the default."""
    return str(row["seed"]) if look_of(row) == "default" else f"{look_of(row)} {row['seed']}"


def add_looks_flag(parser: argparse.ArgumentParser) -> None:
    """``--looks``: the world looks (``fastbd.world.LOOKS``) to run on, checked when parsed."""
    from fastbd.world import LOOKS

    def looks(text: str) -> list[str]:
        names = text.split(",")
        unknown = sorted(set(names) - set(LOOKS))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown look(s) {', '.join(unknown)}; known: "
                                             f"{', '.join(LOOKS)}")
        return names

    parser.add_argument("--looks", type=looks, default=["default"],
                        help=f"world looks, comma-separated: {', '.join(LOOKS)}")

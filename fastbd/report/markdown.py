"""``report.md``: one page per run that puts a result's decision, its numbers and its pictures
together (the pictures are the PNGs beside it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _flat(values: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple):
        shown = ", ".join(str(v) for v in value[:12])
        return f"[{shown}{', …' if len(value) > 12 else ''}] ({len(value)})"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_report(title: str, decision: str, tables: Mapping[str, Mapping[str, object]],
                    images: Sequence[tuple[str, str]] = ()) -> str:
    """A markdown page: ``title``, the one-line ``decision``, one two-column table per entry
    of ``tables`` (nested values flattened to ``a.b`` rows) and the ``images`` (caption, file
    name relative to the report)."""
    lines = [f"# {title}", "", decision, ""]
    for heading, values in tables.items():
        flat = _flat(values)
        if not flat:
            continue
        lines += [f"## {heading}", "", "| | |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in flat.items()]
        lines.append("")
    for caption, name in images:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines)

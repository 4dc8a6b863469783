"""One JSON line per run: printed, and appended to a results file (the diagnostic scripts')."""

import json
from pathlib import Path


def emit(row: dict, out: str | Path) -> None:
    """Print ``row`` as one JSON line and append it to ``out`` (parents created)."""
    line = json.dumps(row)
    print(line)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(line + "\n")

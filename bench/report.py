"""Markdown table from pytest-benchmark JSON files: median time per benchmark, its ratio to the
plain-torch (or scikit-learn) baseline of the same group, and recorded rates.

    python bench/report.py bench/results/*.json
"""

import json
import re
import sys
from pathlib import Path


def rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    machine = data.get("fastbd_machine", {})
    where = machine.get("gpu") or data.get("machine_info", {}).get("cpu", {}).get(
        "brand_raw", "cpu")
    groups: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        match = re.match(r"(.+)\[(.+)\]", bench["name"])
        group, impl = match.groups() if match else (bench["name"], "-")
        groups.setdefault(group, {})[impl] = bench
    out = []
    for group, impls in groups.items():
        baseline = impls.get("plain_torch") or impls.get("sklearn")
        for impl, bench in impls.items():
            median = bench["stats"]["median"]
            ratio = (f"{baseline['stats']['median'] / median:.2f}×"
                     if baseline is not None and baseline is not bench else "—")
            rates = ", ".join(f"{k.removesuffix('_per_s')} {v:.3g}/s"
                              for k, v in bench["extra_info"].items() if k.endswith("_per_s"))
            out.append(f"| {group} | {impl} | {median * 1e3:.2f} | {ratio} | {rates} | {where} |")
    return out


def main(paths: list[str]) -> None:
    print("| benchmark | implementation | median ms | speed-up vs baseline | rates | machine |")
    print("|---|---|---:|---:|---|---|")
    for path in paths:
        print("\n".join(rows(Path(path))))


if __name__ == "__main__":
    main(sys.argv[1:])

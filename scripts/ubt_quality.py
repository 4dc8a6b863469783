"""Measure UBT and the baselines against the quality targets of issue 5.

Runs ``fastbd.demo.ubt.run`` (fixed seed; threat models cached by config hash), prints the
CA/ASR table, writes it as JSON, and exits non-zero when a target is missed:

* every attack, after UBT: ASR ≤ 2 % and CA ≥ poisoned CA − 2 points;
* BadNet: the top set ≥ 90 % truly poisoned;
* the clean model: the check declines and CA is unchanged.

A target on an attack whose poisoned model has no real backdoor (ASR before < 50 %) is
reported as ``no backdoor`` rather than met.

    python scripts/ubt_quality.py [--out results/ubt-quality-cpu.json] [--device cpu]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from fastbd.demo.ubt import run


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["method"] != "ubt":
            continue
        if r["attack"] == "none":
            ok = (not r["poisoned"]) and r["ca_after"] == r["ca_before"]
            out.append({"attack": "none", "target": "check declines, CA unchanged",
                        "verdict": "ok" if ok else "MISSED"})
            continue
        real = r["asr_before"] >= 0.5
        ok = r["asr_after"] <= 0.02 and r["ca_after"] >= r["ca_before"] - 0.02
        verdict = ("ok" if ok else "MISSED") if real else "no backdoor"
        out.append({"attack": r["attack"], "target": "ASR ≤ 2 %, CA ≥ before − 2",
                    "verdict": verdict})
        if r["attack"] == "badnet":
            precise = r["topk_poisoned"] >= 0.9 * r["topk"]
            out.append({"attack": "badnet", "target": "top set ≥ 90 % poisoned",
                        "verdict": "ok" if precise else "MISSED"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/ubt-quality-cpu.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--report", default="fastbd-out/demo/ubt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    report = run(args.report, device=args.device, seed=args.seed, cache_dir=args.cache,
                 verbose=False)
    print(report.table())
    checks = verdicts(report.rows)
    for check in checks:
        print(f"{check['attack']:<8} {check['target']:<32} {check['verdict']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": report.rows, "checks": checks,
                                          "threats": report.threats,
                                          "wall_s": time.perf_counter() - start}, indent=2,
                                         default=str))
    return 1 if any(c["verdict"] == "MISSED" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

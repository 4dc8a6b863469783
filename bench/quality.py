"""Quality runs on the synthetic world, each checked against its targets; prints a table, writes
JSON, exits 1 when a target is missed.

    python bench/quality.py world      [--out bench/results/world-quality.json]
    python bench/quality.py poisoncam  [--seeds 0 1 2] [--out ...]
    python bench/quality.py ubt        [--out ...]

* ``world``: the SSL encoder trained on the HTBA-poisoned and on the clean world (linear-probe
  CA ≥ 60 %; ASR ≥ 30 % poisoned, ≤ 5 % clean; training ≤ 300 s) and a tiny CLIP on the clean
  world and under each CLIP attack (``WORLD_CLIP_TARGETS``).
* ``poisoncam``: PoisonCAM, PatchSearch (fastbd's variant) and PatchSearch as published, with
  the demo's config on each seed's demo threat model (``implanted``: CorruptEncoder data and a
  BadEncoder training-time attack); PoisonCAM recall ≥ 95 %, precision ≥ 80 %, top-20 windows
  on the trigger ≥ 90 %.
* ``ubt``: the UBT demo; after UBT every attack with a real backdoor (ASR before ≥ 50 %) has
  ASR ≤ 2 % and CA ≥ CA before − 2 points, BadNet's top set is ≥ 90 % poisoned, the clean
  model is declined and left unchanged.

Threat models are cached by config hash (``--cache``), so reruns measure the defenses only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TRAIN_LIMIT_S = 300
WORLD_CLIP_TARGETS = {"none": (0.60, None, 0.05), "badnet": (0.60, 0.80, None),
                      "blended": (None, 0.50, None), "sig": (None, 0.50, None),
                      "wanet": (None, 0.50, None), "dualkey": (None, 0.50, None),
                      "trojvqa": (None, 0.50, None), "ssba": (None, 0.50, None)}
"""Per CLIP attack: (CA at least, ASR at least, ASR at most); None: no bound."""
POISONCAM_TARGETS = {"recall": 0.95, "precision": 0.80, "trigger_overlap": 0.90}


def within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def poisoncam_misses(row: dict) -> list[str]:
    """The PoisonCAM targets a detector row (``fastbd.demo.poisoncam`` report row) misses."""
    if row["method"] != "poisoncam":
        return []
    return [f"seed{row['seed']}/{name}={row[name]:.3f}" for name, bound in
            POISONCAM_TARGETS.items() if row[name] < bound]


def ubt_verdicts(rows: list[dict]) -> list[dict]:
    """One verdict per UBT target over the UBT demo's rows: ``ok``, ``MISSED`` or, for an attack
    whose poisoned model has no real backdoor (ASR before < 50 %), ``no backdoor``."""
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
        out.append({"attack": r["attack"], "target": "ASR ≤ 2 %, CA ≥ before − 2",
                    "verdict": ("ok" if ok else "MISSED") if real else "no backdoor"})
        if r["attack"] == "badnet":
            precise = r["topk_poisoned"] >= 0.9 * r["topk"]
            out.append({"attack": "badnet", "target": "top set ≥ 90 % poisoned",
                        "verdict": "ok" if precise else "MISSED"})
    return out


def world_row_checks(row: dict) -> dict[str, bool]:
    """Which targets a world row (``model``, ``attack``, ``ca``, ``asr``, ``train_s``) meets."""
    if row["model"] == "ssl":
        ca_min, asr_min, asr_max = 0.60, *((0.30, None) if row["attack"] == "htba" else
                                           (None, 0.05))
    else:
        ca_min, asr_min, asr_max = WORLD_CLIP_TARGETS[row["attack"]]
    return {"ca": within(row["ca"], ca_min, None), "asr": within(row["asr"], asr_min, asr_max),
            "time": within(row["train_s"], None, TRAIN_LIMIT_S)}


def run_world(args: argparse.Namespace) -> dict:
    from fastbd.world import CLIPThreatConfig, SSLThreatConfig, build_clip_threat, build_ssl_threat

    rows = []
    for model, attacks in (("ssl", ("htba", "none")), ("clip", tuple(WORLD_CLIP_TARGETS))):
        for attack in attacks:
            start = time.perf_counter()
            if model == "ssl":
                threat = build_ssl_threat(SSLThreatConfig(attack=attack), cache_dir=args.cache,
                                          device=args.device, verbose=False)
                ca, asr = threat.probe.clean_accuracy, threat.probe.asr
            else:
                threat = build_clip_threat(CLIPThreatConfig(attack=attack),
                                           cache_dir=args.cache, device=args.device,
                                           verbose=False)
                ca, asr = threat.evaluation.clean_accuracy, threat.evaluation.asr
            row = {"model": model, "attack": attack, "ca": ca, "asr": asr,
                   "train_s": threat.train_seconds, "cached": threat.cached,
                   "wall_s": time.perf_counter() - start}
            row["met"] = world_row_checks(row)
            rows.append(row)
            print(json.dumps(row), flush=True)
    missed = [f"{r['model']}/{r['attack']}/{k}" for r in rows for k, ok in r["met"].items()
              if not ok]
    return {"rows": rows, "missed": missed}


def run_poisoncam(args: argparse.Namespace) -> dict:
    from fastbd.demo.poisoncam import run

    rows, missed = [], []
    for seed in args.seeds:
        report = run(Path(args.report) / f"seed{seed}", device=args.device, seed=seed,
                     cache_dir=args.cache, verbose=False)
        for row in report.rows:
            row = {"seed": seed, **row}
            rows.append(row)
            missed += poisoncam_misses(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows, "missed": missed}


def run_ubt(args: argparse.Namespace) -> dict:
    from fastbd.demo.ubt import run

    report = run(args.report, device=args.device, seed=args.seeds[0], cache_dir=args.cache,
                 verbose=False)
    print(report.table())
    checks = ubt_verdicts(report.rows)
    for check in checks:
        print(f"{check['attack']:<8} {check['target']:<32} {check['verdict']}")
    return {"rows": report.rows, "checks": checks, "threats": report.threats,
            "missed": [f"{c['attack']}: {c['target']}" for c in checks
                       if c["verdict"] == "MISSED"]}


RUNS = {"world": run_world, "poisoncam": run_poisoncam, "ubt": run_ubt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=RUNS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="world seeds (poisoncam: each; ubt: the first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="fastbd-out/cache", help="threat-model cache")
    parser.add_argument("--report", default="fastbd-out/quality",
                        help="where the detectors' and defenses' reports go")
    parser.add_argument("--out", help="JSON file (default bench/results/<which>-quality.json)")
    args = parser.parse_args(argv)
    from fastbd.storage import write_text_atomically

    start = time.perf_counter()
    result = RUNS[args.which](args)
    result["wall_s"] = time.perf_counter() - start
    out = Path(args.out or f"bench/results/{args.which}-quality.json")
    write_text_atomically(json.dumps(result, indent=2, default=str), out)
    print(f"wrote {out}; missed: {result['missed'] or 'none'}")
    return 1 if result["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the poisoned world's threat models against the quality targets of issue 3.

Trains (fixed seeds, default configs) the SSL encoder on the HTBA-poisoned and the clean world,
and a tiny CLIP on the clean world and under each CLIP attack; prints a table, writes JSON, and
exits non-zero if a target is missed.

    python scripts/world_quality.py [--out results/world-quality.json] [--device cpu]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastbd.world import CLIPThreatConfig, SSLThreatConfig, build_clip_threat, build_ssl_threat

CLIP_TARGETS = {"none": (0.60, None, 0.05), "badnet": (0.60, 0.80, None),
                "blended": (None, 0.50, None), "sig": (None, 0.50, None),
                "wanet": (None, 0.50, None), "dualkey": (None, 0.50, None)}
TRAIN_LIMIT_S = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/world-quality.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--only", choices=("ssl", "clip"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows, failures = [], []

    def check(name: str, value: float, low: float | None, high: float | None) -> str:
        ok = (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            failures.append(f"{name}={value:.3f}")
        return "ok" if ok else "MISSED"

    if args.only in (None, "ssl"):
        for attack in ("htba", "none"):
            start = time.perf_counter()
            threat = build_ssl_threat(SSLThreatConfig(attack=attack), cache_dir=args.cache,
                                      device=args.device, verbose=False)
            probe = threat.probe
            row = {"model": "ssl", "attack": attack, "ca": probe.clean_accuracy,
                   "asr": probe.asr, "train_s": threat.train_seconds,
                   "wall_s": time.perf_counter() - start, "cached": threat.cached}
            row["ca_ok"] = check(f"ssl/{attack}/ca", probe.clean_accuracy, 0.60, None)
            row["asr_ok"] = check(f"ssl/{attack}/asr", probe.asr,
                                  0.30 if attack == "htba" else None,
                                  None if attack == "htba" else 0.05)
            row["time_ok"] = check(f"ssl/{attack}/train_s", threat.train_seconds, None,
                                   TRAIN_LIMIT_S)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.only in (None, "clip"):
        for attack, (ca_min, asr_min, asr_max) in CLIP_TARGETS.items():
            start = time.perf_counter()
            threat = build_clip_threat(CLIPThreatConfig(attack=attack), cache_dir=args.cache,
                                       device=args.device, verbose=False)
            ev = threat.evaluation
            row = {"model": "clip", "attack": attack, "ca": ev.clean_accuracy, "asr": ev.asr,
                   "train_s": threat.train_seconds, "wall_s": time.perf_counter() - start,
                   "cached": threat.cached,
                   "poisoned_pairs": int(threat.poisoned.poison_mask.sum())}
            row["ca_ok"] = check(f"clip/{attack}/ca", ev.clean_accuracy, ca_min, None)
            row["asr_ok"] = check(f"clip/{attack}/asr", ev.asr, asr_min, asr_max)
            row["time_ok"] = check(f"clip/{attack}/train_s", threat.train_seconds, None,
                                   TRAIN_LIMIT_S)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<5} {'attack':<8} {'CA':>6} {'ASR':>6} {'train s':>8}")
    for r in rows:
        print(f"{r['model']:<5} {r['attack']:<8} {100 * r['ca']:>5.1f}% {100 * r['asr']:>5.1f}% "
              f"{r['train_s']:>8.1f}  {r['ca_ok']}/{r['asr_ok']}/{r['time_ok']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "missed": failures}, indent=2))
    print(f"wrote {out}; missed: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""PoisonCAM and PatchSearch on the synthetic world over several seeds, against issue 4's
targets (PoisonCAM recall ≥ 95 %, precision ≥ 70 %, ≥ 90 % of the top-20 windows on the
trigger). Each seed builds its own poisoned world and SSL threat model (cached), runs both
detectors with the demo config, prints a table, writes JSON, exits non-zero on a miss.

    python scripts/poisoncam_quality.py [--seeds 0 1 2] [--out results/poisoncam-quality.json]
"""

import argparse
import json
import sys
from pathlib import Path

from fastbd.demo.poisoncam import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--out", default="results/poisoncam-quality.json")
    args = parser.parse_args()
    rows, missed = [], []
    for seed in args.seeds:
        report = run(Path("fastbd-out/quality") / f"seed{seed}", device=args.device, seed=seed,
                     cache_dir=args.cache, verbose=False)
        for row in report.rows:
            row = {"seed": seed, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["method"] == "poisoncam":
                for name, value, bound in (("recall", row["recall"], 0.95),
                                           ("precision", row["precision"], 0.70),
                                           ("trigger_overlap", row["trigger_overlap"], 0.90)):
                    if value < bound:
                        missed.append(f"seed{seed}/{name}={value:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "missed": missed}, indent=2))
    print(f"wrote {out}; missed: {missed or 'none'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

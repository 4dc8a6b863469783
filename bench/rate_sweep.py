"""UBT at poison rates the defender does not know: attack × rate × split rule through the CLI.

For every attack and rate, ``fastbd loop clip`` exports the poisoned synthetic world, trains the
backdoored tiny CLIP and a clean reference on the unpoisoned rows, measures zero-shot CA/ASR
(the planted trigger) and runs UBT with its default (``adaptive``) split; then ``fastbd ubt``
with the paper's ``fixed`` 1 % split on the same models and ``fastbd eval clip`` after it.
Clean models (clean CLIPs of two other seeds) give the check statistic's distribution on
models without a backdoor, next to the poisoned models'.

``python bench/rate_sweep.py --jobs 2`` writes ``rate_sweep.json`` and prints the tables;
``--small`` runs a minute-sized version. Each command runs with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ATTACKS = ("badnet", "blended", "sig")
RATES = (0.005, 0.01, 0.02, 0.05)


def fastbd(*args: str) -> float:
    """One ``fastbd`` command in a subprocess, one torch thread; its seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastbd", "--quiet", "--threads", "1", *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fastbd {' '.join(args)}: {done.stderr.strip()}")
    return time.perf_counter() - start


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def cell(work: Path, attack: str, rate: float, sizes: list[str], epochs: str) -> dict:
    """One attack at one rate: the loop (adaptive split), then the fixed split on its models."""
    out = work / f"{attack}-{rate:g}"
    seconds = {"loop": fastbd("loop", "clip", "--poison", attack, "--rate", str(rate), *sizes,
                              "--epochs", epochs, "--defenses", "ubt", "--out", str(out))}
    rows = read(out / "loop.json")["rows"]
    fixed_config = work / "fixed.json"
    data = out / "data"
    seconds["ubt fixed"] = fastbd(
        "ubt", "--csv", str(data / "train.csv"), "--checkpoint",
        str(out / "train-poisoned" / "clip.pt"), "--reference-checkpoint",
        str(out / "train-clean" / "clip.pt"), "--config", str(fixed_config), "--out",
        str(out / "ubt-fixed"))
    fastbd("eval", "clip", "--checkpoint", str(out / "ubt-fixed" / "model.pt"), "--eval-csv",
           str(data / "val.csv"), "--class-names", str(data / "classes.txt"), "--attack-spec",
           str(data / "attack.json"), "--out", str(out / "eval-ubt-fixed"))
    adaptive, fixed = read(out / "ubt" / "result.json"), read(out / "ubt-fixed" / "result.json")
    after_fixed = read(out / "eval-ubt-fixed" / "eval.json")
    seconds["ubt adaptive"] = sum(adaptive["timings_s"].values())
    return {"attack": attack, "rate": rate, "poisoned": rows["poisoned"],
            "adaptive": {**rows["ubt"], "check_statistic": adaptive["check_statistic"],
                         "declined": not adaptive["poisoned"]},
            "fixed": {**after_fixed, "suspicious": fixed["suspicious"],
                      "suspicious_poisoned": fixed.get("suspicious_poisoned"),
                      "check_statistic": fixed["check_statistic"],
                      "declined": not fixed["poisoned"]},
            "seconds": seconds}


def clean_check(work: Path, attack: str, seed: int, epochs: str) -> dict:
    """The check statistic of a clean model (trained on the unpoisoned rows with another
    seed) against the 1 % cell's clean reference."""
    out = work / f"{attack}-0.01"
    model = work / f"clean-{attack}-{seed}"
    fastbd("train-clip", "--csv", str(out / "data" / "clean.csv"), "--epochs", epochs,
           "--seed", str(seed), "--out", str(model))
    fastbd("ubt", "--csv", str(out / "data" / "clean.csv"), "--checkpoint",
           str(model / "clip.pt"), "--reference-checkpoint", str(out / "train-clean" / "clip.pt"),
           "--out", str(model / "ubt"))
    result = read(model / "ubt" / "result.json")
    return {"attack": attack, "seed": seed, "check_statistic": result["check_statistic"],
            "declined": not result["poisoned"]}


def tables(results: dict) -> str:
    lines = ["| attack | rate | CA before | ASR before | split | suspicious (poisoned) | "
             "CA after | ASR after | check |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for c in results["cells"]:
        before = c["poisoned"]
        for rule in ("adaptive", "fixed"):
            r = c[rule]
            lines.append(
                f"| {c['attack']} | {100 * c['rate']:g} % | {100 * before['clean_accuracy']:.1f} | "
                f"{100 * before['asr']:.1f} | {rule} | {r['suspicious']} "
                f"({r['suspicious_poisoned']}) | {100 * r['clean_accuracy']:.1f} | "
                f"{100 * r['asr']:.1f} | {r['check_statistic']:.2f}"
                f"{' declined' if r['declined'] else ''} |")
    lines += ["", "| clean model | check statistic |", "|---|---:|"]
    lines += [f"| {c['attack']} world, seed {c['seed']} | {c['check_statistic']:.2f}"
              f"{' declined' if c['declined'] else ''} |" for c in results["clean"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="fastbd-out/rate-sweep", help="folder for every run")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--small", action="store_true", help="600 pairs, 2 epochs")
    parser.add_argument("--json", help="results file (default <work>/rate_sweep.json)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "fixed.json").write_text(json.dumps({"split": "fixed"}))
    sizes = ["--n-train", "600", "--n-eval", "200"] if args.small else []
    epochs = "2" if args.small else "8"
    with ThreadPoolExecutor(args.jobs) as pool:
        cells = list(pool.map(lambda job: cell(work, *job, sizes, epochs),
                              [(a, r) for a in ATTACKS for r in RATES]))
        clean = list(pool.map(lambda job: clean_check(work, *job, epochs),
                              [(a, seed) for a in ATTACKS for seed in (1, 2)]))
    results = {"cells": cells, "clean": clean}
    path = Path(args.json or work / "rate_sweep.json")
    path.write_text(json.dumps(results, indent=2))
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

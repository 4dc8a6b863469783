"""The SSL detectors' backdoor check on clean and backdoored data.

For each world seed: the implanted SSL threat model (``implanted_ssl_threat``: CorruptEncoder
poisons + a BadEncoder fine-tune, a real backdoor) and the same world with no attack at all
(clean images, plain SimCLR: the data most users check). Each detector runs with the demo's
configuration; the table gives the check statistic (median over the top-k of capture −
pasting − escape, threshold 0.5), what was removed and the detection quality, and the check's
own cost.

    python bench/ssl_check.py --seeds 0,1,2 [--jobs 2]
    python bench/ssl_check.py --seeds 0 --looks noisy,faint,many-classes --jobs 2

``--looks`` runs the same on worlds of other looks (``fastbd.world.LOOKS``), never used to
choose the detectors' constants.

Finished runs are kept in the JSON and skipped on a rerun; each run rewrites the "SSL backdoor
check" section of ``docs/results.md``. Each worker uses one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from results_doc import add_looks_flag, look_of, world_label, write_section

DETECTORS = ("poisoncam", "patchsearch", "patchsearch-published")
KINDS = ("clean", "implanted")


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def threat_config(seed: int, kind: str, look: str = "default"):
    """The implanted threat model of ``seed`` (or, ``kind`` clean, its world with no attack) on
    a world of ``look`` (``fastbd.world.LOOKS``)."""
    from fastbd.world import implanted_ssl_threat, with_look

    config = implanted_ssl_threat(seed)
    config = replace(config, world=with_look(config.world, look))
    return config if kind == "implanted" else replace(config, attack="none",
                                                      training_attack="none")


def run(seed: int, kind: str, cache: str, detectors: tuple[str, ...] = DETECTORS,
        look: str = "default") -> list[dict]:
    """The ``detectors`` on one world (its threat model trained or loaded from the cache)."""
    from fastbd import registry
    from fastbd.demo.poisoncam import demo_config
    from fastbd.world import build_ssl_threat

    threat = build_ssl_threat(threat_config(seed, kind, look), cache_dir=cache, verbose=False)
    truth = threat.poisoned.poison_mask
    rows = []
    for name in detectors:
        start = time.process_time()
        result = registry.detector(name, demo_config(seed)).fit(
            threat.encoder, threat.poisoned.images, device="cpu", ground_truth=truth,
            true_boxes=threat.poisoned.boxes, verbose=False).result_
        check = result.check
        rows.append({
            "look": look, "seed": seed, "kind": kind, "detector": name,
            "probe_ca": threat.probe.clean_accuracy, "probe_asr": threat.probe.asr,
            "images": int(truth.numel()),
            "poisoned": int(truth.sum()), "removed": int(result.removed.sum()),
            "precision": result.metrics.precision, "recall": result.metrics.recall,
            "topk_accuracy": result.topk_accuracy, "warnings": result.warnings,
            "statistic": check.get("statistic"), "backdoor": check.get("backdoor"),
            "capture_median": (statistics.median(check["capture"]) if check else None),
            "pasting": check["pasting"] if check else None,
            "escape_median": (statistics.median(check["escape"]) if check else None),
            "check_s": result.timings.get("check"), "cpu_s": time.process_time() - start})
    return rows


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def tables(rows: list[dict]) -> str:
    from fastbd.world import LOOKS

    lines = ["| world | data | probe CA / ASR | detector | check (capture, pasting, escape) | "
             "removed | precision | recall | top-20 | check s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (list(LOOKS).index(look_of(r)), r["seed"],
                                         KINDS.index(r["kind"]),
                                         DETECTORS.index(r["detector"]))):
        check = ("off" if r["statistic"] is None else
                 f"{r['statistic']:.2f} ({r['capture_median']:.2f}, {r['pasting']:.2f}, "
                 f"{r['escape_median']:.2f})"
                 f"{'' if r['backdoor'] else ' no backdoor'}")
        lines.append(
            f"| {world_label(r)} | {r['kind']} | "
            f"{_pct(r['probe_ca'])} / {_pct(r['probe_asr'])} | "
            f"{r['detector']} | {check} | {r['removed']} ({_pct(r['removed'] / r['images'])} %) "
            f"| {_pct(r['precision']) if r['poisoned'] else '–'} | "
            f"{_pct(r['recall']) if r['poisoned'] else '–'} | "
            f"{_pct(r['topk_accuracy']) if r['poisoned'] else '–'} | "
            f"{_seconds(r['check_s'])} |")
    checked = [r for r in rows if r["statistic"] is not None]
    clean = [r["statistic"] for r in checked if r["kind"] == "clean"]
    poisoned = [r["statistic"] for r in checked if r["kind"] == "implanted"]
    if clean and poisoned:
        lines += ["", f"Check statistic: clean runs {min(clean):.2f} to {max(clean):.2f}, "
                  f"backdoored runs {min(poisoned):.2f} to {max(poisoned):.2f} (threshold "
                  f"0.50); margin {min(poisoned) - max(clean):.2f}."]
    wrong = [f"{r['detector']} on {r['kind']} world {world_label(r)}" for r in checked
             if r["backdoor"] != (r["kind"] == "implanted")]
    if checked:
        lines += ["", f"Wrong verdicts: {len(wrong)} of {len(checked)} checked runs"
                  + (": " + "; ".join(wrong) if wrong else "") + "."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--json", default="bench/results/ssl-check-cpu-amd-epyc.json")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    add_looks_flag(parser)
    parser.add_argument("--rerun", action="store_true",
                        help="measure these seeds and detectors again (their rows replaced)")
    args = parser.parse_args()
    path = Path(args.json)
    detectors = tuple(args.detectors.split(","))
    seeds_asked = {int(s) for s in args.seeds.split(",")}
    rows = json.loads(path.read_text()) if path.is_file() else []
    looks = args.looks
    if args.rerun:
        rows = [r for r in rows if not (r["seed"] in seeds_asked and look_of(r) in looks
                                        and r["detector"] in detectors)]
    done = {(look_of(r), r["seed"], r["kind"]) for r in rows if r["detector"] in detectors}
    todo = [(look, int(s), kind) for look in looks for s in args.seeds.split(",")
            for kind in KINDS if (look, int(s), kind) not in done]
    with ProcessPoolExecutor(args.jobs, initializer=_threads) as pool:
        for found in pool.map(run, [s for _, s, _ in todo], [k for _, _, k in todo],
                              [args.cache] * len(todo), [detectors] * len(todo),
                              [look for look, _, _ in todo]):
            rows += found
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))
            print(json.dumps(found), flush=True)
    text = tables(rows)
    write_section("ssl-check", "## SSL backdoor check (`bench/ssl_check.py`)\n\nThe demo's "
                  "detector configuration on the implanted threat model and on the same world "
                  "with no attack (5,000 32-px images; SimCLR; one thread per world; 2-core AMD "
                  "EPYC; the world column is the seed, prefixed by its look — "
                  "`fastbd.world.LOOKS` — where not the default). Check: median over the "
                  "top-20 candidates of capture − pasting − "
                  "escape (in brackets: the median capture, pasting = the upper quartile of "
                  "what 40 ordinary windows capture, the median escape).\n\n"
                  + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

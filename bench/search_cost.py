"""The search's cost, exhaustive against sequential flip testing, at the detection quality each
gives.

For each world (the implanted SSL threat of ``implanted_ssl_threat`` and the HTBA threat of
``SSLThreatConfig``, each per seed; threat models trained once, then cached) PoisonCAM runs
with the demo's configuration twice — ``flip_test="exhaustive"`` (the papers') and
``"sequential"`` — and records per stage the encoder forwards and seconds, the detection's CPU
and wall seconds, precision / recall / F1 / top-20 accuracy, and the Jaccard index of the two
runs' removed sets. One torch thread per worker; the two runs of a world are interleaved in
one process, CPU time (``time.process_time``) beside wall time.

    python bench/search_cost.py --jobs 2                     # seeds 0-2, both worlds
    python bench/search_cost.py --seeds 0 --worlds implanted

Finished worlds are kept in the JSON (``bench/results/search-cost-<machine>.json``, with a
``summary``: per world the exhaustive ÷ sequential ratio of search forwards and of search
seconds) and skipped on a rerun; each run rewrites the "Search cost" section of
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from results_doc import add_sweep_flags, write_section

MODES = ("exhaustive", "sequential")
WORLDS = ("implanted", "htba")
SEARCH_STAGES = ("candidates", "flip_test")
"""The stages of the iterative search proper (masking and flip testing)."""


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def threat_config(seed: int, world: str):
    from fastbd.world import SSLThreatConfig, implanted_ssl_threat

    return implanted_ssl_threat(seed) if world == "implanted" else SSLThreatConfig(seed=seed)


def run(seed: int, world: str, cache: str) -> dict:
    """PoisonCAM exhaustive and sequential on one world."""
    from fastbd.demo.poisoncam import demo_config
    from fastbd.poisoncam import detect
    from fastbd.world import build_ssl_threat

    threat = build_ssl_threat(threat_config(seed, world), cache_dir=cache, verbose=False)
    truth = threat.poisoned.poison_mask
    out = {"seed": seed, "world": world, "images": int(truth.numel()),
           "poisoned": int(truth.sum()), "modes": {}}
    removed = {}
    for mode in MODES:
        cpu, wall = time.process_time(), time.perf_counter()
        result = detect(threat.encoder, threat.poisoned.images,
                        replace(demo_config(seed), flip_test=mode), ground_truth=truth,
                        true_boxes=threat.poisoned.boxes, verbose=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        removed[mode] = result.removed
        metrics = result.metrics
        out["modes"][mode] = {
            "cpu_s": cpu, "wall_s": wall, "forwards": result.forwards,
            "timings_s": result.timings,
            "search_forwards": sum(result.forwards.get(s, 0) for s in SEARCH_STAGES),
            "search_s": sum(result.timings.get(s, 0.0) for s in SEARCH_STAGES),
            "scored": int(result.scored_ranking.numel()), "removed": int(result.removed.sum()),
            "precision": metrics.precision, "recall": metrics.recall, "f1": metrics.f1,
            "top20": result.topk_accuracy, "topk": result.topk.tolist()}
    both = (removed["exhaustive"] | removed["sequential"]).sum()
    out["removed_jaccard"] = float((removed["exhaustive"] & removed["sequential"]).sum()
                                   / both) if both else 1.0
    out["topk_equal"] = out["modes"]["exhaustive"]["topk"] == out["modes"]["sequential"]["topk"]
    return out


def summary(rows: list[dict]) -> dict:
    """Per world (``<world>_seed<seed>``) the exhaustive ÷ sequential ratios of search forwards
    and search seconds."""
    out = {}
    for row in rows:
        ex, seq = row["modes"]["exhaustive"], row["modes"]["sequential"]
        name = f"{row['world']}_seed{row['seed']}"
        out[f"{name}_search_forwards_ratio"] = ex["search_forwards"] / seq["search_forwards"]
        out[f"{name}_search_seconds_ratio"] = ex["search_s"] / seq["search_s"]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| world | seed | flip test | search forwards (flip test) | search s | CPU s | "
             "removed | P / R / F1 % | top-20 % | Jaccard |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["world"], r["seed"])):
        for mode in MODES:
            m = row["modes"][mode]
            lines.append(
                f"| {row['world']} | {row['seed']} | {mode} | {m['search_forwards']:,} "
                f"({m['forwards'].get('flip_test', 0):,}) | {m['search_s']:.1f} | "
                f"{m['cpu_s']:.1f} | {m['removed']} | {100 * m['precision']:.1f} / "
                f"{100 * m['recall']:.1f} / {100 * m['f1']:.1f} | {100 * m['top20']:.0f} | "
                + (f"{row['removed_jaccard']:.3f} |" if mode == "sequential" else "|"))
    ratios = summary(rows)
    forwards = [v for k, v in ratios.items() if k.endswith("forwards_ratio")]
    seconds = [v for k, v in ratios.items() if k.endswith("seconds_ratio")]
    if forwards:
        lines += ["", f"Exhaustive ÷ sequential: search forwards {min(forwards):.2f}–"
                  f"{max(forwards):.2f}×, search seconds {min(seconds):.2f}–{max(seconds):.2f}×."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--worlds", default=",".join(WORLDS))
    add_sweep_flags(parser, "search-cost", "worlds")
    args = parser.parse_args()
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.is_file() else {"worlds": []}
    done = {(r["seed"], r["world"]) for r in saved["worlds"]}
    todo = [(int(s), w) for w in args.worlds.split(",") for s in args.seeds.split(",")
            if (int(s), w) not in done]
    with ProcessPoolExecutor(args.jobs, initializer=_threads) as pool:
        for row in pool.map(run, *zip(*todo, strict=True), [args.cache] * len(todo)) \
                if todo else []:
            saved["worlds"].append(row)
            saved["summary"] = summary(saved["worlds"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1))
            print(json.dumps({k: v for k, v in row.items() if k != "modes"}), flush=True)
    text = table(saved["worlds"])
    if not args.no_docs:
        write_section("search-cost", "## Search cost: exhaustive and sequential flip tests "
                      "(`bench/search_cost.py`)\n\nPoisonCAM with the demo's configuration "
                      "(64 masks, 150 test images, 50 clusters), 5,000-image worlds, one thread "
                      "per world, 2-core AMD EPYC; search = masking + flip test, its seconds "
                      "the stages' wall time (two or three jobs shared the two cores: the "
                      "forwards are the measure; CPU s is the whole detection's process "
                      "time).\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

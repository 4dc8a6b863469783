"""PoisonCAM and PatchSearch on SSL threat models whose backdoor is real.

For each seed: the world poisoned with CorruptEncoder and its encoder backdoored by the
training-time BadEncoder fine-tune (``fastbd.world.implanted_ssl_threat``); the three detectors
with the demo's config against ground truth; then the encoder retrained with plain SimCLR (no
training-time attack) on PoisonCAM's filtered set and on the unfiltered set, both probed for
CA/ASR. Also the rungs below: the same recipe without the fine-tune (data poisoning only) and on
the clean world (CorruptEncoder's trigger).

``python bench/implanted_ssl.py --seeds 0 1 2 --jobs 2`` writes ``implanted_ssl.json`` and
prints the tables. Each seed runs in its own process with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path


def one_seed(seed: int, cache: str, retrain: bool) -> dict:
    import torch

    from fastbd import registry
    from fastbd.demo.poisoncam import DEMO_DETECTORS, demo_config
    from fastbd.eval.probe import linear_probe
    from fastbd.models.encoders import small_encoder
    from fastbd.training.ssl import train_ssl
    from fastbd.world import build_ssl_threat
    from fastbd.world.threats import implanted_ssl_threat

    torch.set_num_threads(1)
    config = implanted_ssl_threat(seed)
    start = time.perf_counter()
    threat = build_ssl_threat(config, cache_dir=cache, verbose=False)
    out = {"seed": seed, "threat": {**threat.probe.to_dict(), "train_s": threat.train_seconds,
                                    "wall_s": time.perf_counter() - start,
                                    "poisoned": int(threat.poisoned.poison_mask.sum()),
                                    "images": int(threat.poisoned.images.shape[0])}}
    world, trigger = threat.world, config.trigger()

    def probe(encoder):
        return linear_probe(encoder, world.train.images, world.train.labels, world.eval.images,
                            world.eval.labels, trigger, config.target, config.probe).to_dict()

    truth, boxes = threat.poisoned.poison_mask, threat.poisoned.boxes
    out["detectors"], removed = {}, {}
    for method in DEMO_DETECTORS:
        start = time.perf_counter()
        result = registry.detector(method, demo_config(seed)).fit(
            threat.encoder, threat.poisoned.images, ground_truth=truth, true_boxes=boxes,
            verbose=False).result_
        removed[method] = result.removed
        out["detectors"][method] = {
            **result.metrics.to_dict(), "removed": int(result.removed.sum()),
            "topk_accuracy": result.topk_accuracy, "timings_s": result.timings,
            "seconds": time.perf_counter() - start, "warnings": result.warnings}
    if retrain:
        out["retrained"] = {}
        for name, keep in (("unfiltered", torch.ones_like(truth)),
                           ("poisoncam-filtered", ~removed["poisoncam"])):
            encoder = small_encoder(config.width, config.world.image_size, seed=seed)
            start = time.perf_counter()
            train_ssl(encoder, threat.poisoned.images[keep], config.ssl, verbose=False)
            out["retrained"][name] = {**probe(encoder), "images": int(keep.sum()),
                                      "seconds": time.perf_counter() - start}
        for name, rung in (("data poisoning only", replace(config, training_attack="none")),
                           ("clean world", replace(config, attack="none", rate=None,
                                                   training_attack="none"))):
            built = build_ssl_threat(rung, cache_dir=cache, verbose=False)
            out.setdefault("rungs", {})[name] = {**probe(built.encoder),
                                                 "train_s": built.train_seconds}
    return out


def tables(results: list[dict]) -> str:
    lines = ["| seed | threat CA | ASR | detector | precision | recall | F1 | AUROC | AUPRC | "
             "removed | top-20 | s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["threat"]
        for method, d in r["detectors"].items():
            lines.append(f"| {r['seed']} | {100 * t['clean_accuracy']:.1f} | "
                         f"{100 * t['asr']:.1f} | {method} | {100 * d['precision']:.1f} | "
                         f"{100 * d['recall']:.1f} | {100 * d['f1']:.1f} | {d['auroc']:.3f} | "
                         f"{d['auprc']:.3f} | {d['removed']} | {100 * d['topk_accuracy']:.0f} | "
                         f"{d['seconds']:.0f} |")
    lines += ["", "| seed | encoder | CA | ASR |", "|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r['seed']} | threat (CorruptEncoder + BadEncoder fine-tune) | "
                     f"{100 * r['threat']['clean_accuracy']:.1f} | "
                     f"{100 * r['threat']['asr']:.1f} |")
        for group in ("retrained", "rungs"):
            for name, p in r.get(group, {}).items():
                lines.append(f"| {r['seed']} | {name} | {100 * p['clean_accuracy']:.1f} | "
                             f"{100 * p['asr']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once")
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--no-retrain", action="store_true", help="detectors only")
    parser.add_argument("--json", default="implanted_ssl.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_seed(args.one, args.cache, not args.no_retrain), default=float))
        return 0

    def run(seed: int) -> dict:
        command = [sys.executable, __file__, "--one", str(seed), "--cache", args.cache]
        done = subprocess.run(command + (["--no-retrain"] if args.no_retrain else []),
                              capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise RuntimeError(f"seed {seed}: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, args.seeds))
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

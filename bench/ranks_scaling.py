"""The demo-sized PoisonCAM detection on 1 and 2 CPU ranks (``torchrun``, gloo, one torch
thread per rank; the demo's one classifier member trained by one rank, or data-parallel by both)
against one process with 1 and 2 threads: wall time per stage, the speed-up, and whether the
runs found the same scores, windows and removed set.

``python bench/ranks_scaling.py`` builds (or loads from ``--cache``) the demo's implanted threat
model — the 5,000-image world with the CorruptEncoder poisons and the backdoored encoder —,
writes its images and encoder to ``--work``, runs the four configurations one after the other
(never two at once: they would share the cores) and writes
``bench/results/ranks-scaling-<machine>.json``. ``--worker`` is the detection itself, what each
configuration starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(work: Path, cache: str, seed: int) -> None:
    """The threat model's poisoned images (``bank.npy``), encoder backbone (``encoder.pt``) and
    ground truth, once."""
    import torch

    from fastbd.data.bank import ImageBank
    from fastbd.world import build_ssl_threat, implanted_ssl_threat

    if (work / "meta.json").is_file():
        return
    config = implanted_ssl_threat(seed)
    threat = build_ssl_threat(config, cache_dir=cache, device="cpu", verbose=False)
    work.mkdir(parents=True, exist_ok=True)
    ImageBank(threat.poisoned.images).save(work / "bank.npy")
    torch.save(threat.encoder.backbone.state_dict(), work / "encoder.pt")
    torch.save(threat.poisoned.poison_mask, work / "truth.pt")
    (work / "meta.json").write_text(json.dumps({"arch": f"smallconv{config.width}",
                                                "seed": seed, "threat": threat.to_dict()},
                                               default=str))


def worker(work: Path, out: Path, data_parallel: bool) -> None:
    """One detection (every rank of a torchrun job runs this); rank 0 writes ``out``."""
    from dataclasses import replace

    import torch

    from fastbd import distributed
    from fastbd.data.bank import ImageBank
    from fastbd.demo.poisoncam import demo_config
    from fastbd.models import encoder_by_name
    from fastbd.poisoncam import PoisonCAM

    started = time.perf_counter()
    if distributed.launched():
        distributed.start("cpu", 600)
    meta = json.loads((work / "meta.json").read_text())
    encoder = encoder_by_name(meta["arch"], work / "encoder.pt")
    bank = ImageBank.load(work / "bank.npy")
    truth = torch.load(work / "truth.pt")
    config = demo_config(meta["seed"])
    config = replace(config, classifier=replace(config.classifier, data_parallel=data_parallel))
    fit_start = time.perf_counter()
    result = PoisonCAM(config).fit(encoder, bank, device="cpu", ground_truth=truth,
                                   verbose=False).result_
    fit_seconds = time.perf_counter() - fit_start
    here = distributed.world()
    distributed.stop()
    if not here.main:
        return
    out.write_text(json.dumps({
        "ranks": here.size, "threads_per_rank": torch.get_num_threads(),
        "data_parallel_classifier": data_parallel,
        "fit_seconds": fit_seconds, "process_seconds": time.perf_counter() - started,
        "stage_seconds": result.timings,
        "search_sha256": digest(result.scores, result.windows),
        "removed_sha256": digest(result.removed),
        "margins_sha256": digest(result.margins),
        "removed": int(result.removed.sum()), "precision": result.metrics.precision,
        "recall": result.metrics.recall, "clusters": result.plan["clusters"]}, indent=2))


def digest(*tensors) -> str:
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


RUNS = {"1 process, 1 thread": (None, 1, False), "1 process, 2 threads": (None, 2, False),
        "torchrun 1 rank": (1, 1, False), "torchrun 2 ranks × 1 thread": (2, 1, False),
        "torchrun 2 ranks × 1 thread, data-parallel classifier": (2, 1, True)}


def run_all(work: Path, repeats: int) -> dict:
    runs = {}
    for name, (ranks, threads, data_parallel) in RUNS.items():
        timings = []
        for repeat in range(repeats):
            out = work / f"run-{ranks}-{threads}-{data_parallel}-{repeat}.json"
            out.unlink(missing_ok=True)
            script = [str(Path(__file__).resolve()), "--worker", "--work", str(work),
                      "--out", str(out), *(["--data-parallel"] if data_parallel else [])]
            command = ([sys.executable, *script] if ranks is None else
                       [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={ranks}", *script])
            start = time.perf_counter()
            subprocess.run(command, check=True, timeout=3600,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            record = json.loads(out.read_text())
            record["wall_seconds"] = time.perf_counter() - start
            timings.append(record)
            print(f"{name}: fit {record['fit_seconds']:.1f} s, wall {record['wall_seconds']:.1f} s",
                  flush=True)
        runs[name] = timings
    return runs


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarise(runs: dict) -> dict:
    fit = {name: median([r["fit_seconds"] for r in records]) for name, records in runs.items()}
    stages = {name: {stage: median([r["stage_seconds"][stage] for r in records])
                     for stage in records[0]["stage_seconds"]} for name, records in runs.items()}
    two_ranks, one_rank = "torchrun 2 ranks × 1 thread", "torchrun 1 rank"
    one_thread = [r for records in runs.values() for r in records
                  if r["threads_per_rank"] == 1 and not r["data_parallel_classifier"]]

    def same(key: str, records: list[dict]) -> bool:
        return len({r[key] for r in records}) == 1

    everything = [r for records in runs.values() for r in records]
    return {
        "fit_seconds_median": fit, "stage_seconds_median": stages,
        "identical_results_at_one_thread_per_rank": all(
            same(key, one_thread) for key in ("search_sha256", "removed_sha256",
                                              "margins_sha256")),
        "same_search_everywhere": same("search_sha256", everything),
        "same_removed_set_everywhere": same("removed_sha256", everything),
        "speedup_2_ranks_data_parallel_vs_1_rank": fit[one_rank] / fit[
            "torchrun 2 ranks × 1 thread, data-parallel classifier"],
        "speedup_2_ranks_vs_1_rank": fit[one_rank] / fit[two_ranks],
        "speedup_2_ranks_vs_1_process_2_threads": fit["1 process, 2 threads"] / fit[two_ranks],
        "speedup_2_threads_vs_1_thread": fit["1 process, 1 thread"] / fit["1 process, 2 threads"],
        "stage_speedup_2_ranks_vs_1_rank": {
            stage: stages[one_rank][stage] / stages[two_ranks][stage]
            for stage in stages[one_rank] if stages[two_ranks].get(stage)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="fastbd-out/ranks-scaling")
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="--worker: its JSON; else the bench's (default "
                                      "bench/results/ranks-scaling-<machine>.json)")
    parser.add_argument("--machine", default="cpu-amd-epyc-2core")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data-parallel", action="store_true",
                        help="--worker: the classifier member trained data-parallel")
    args = parser.parse_args()
    work = Path(args.work)
    if args.worker:
        worker(work, Path(args.out), args.data_parallel)
        return 0
    prepare(work, args.cache, args.seed)
    runs = run_all(work, args.repeats)
    import torch

    report = {"machine": args.machine, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__,
              "detection": "PoisonCAM, demo config, implanted threat seed "
                           f"{args.seed} (5,000 images, 32 px)",
              "repeats": args.repeats, **summarise(runs), "runs": runs}
    out = Path(args.out or ROOT / "bench" / "results" / f"ranks-scaling-{args.machine}.json")
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

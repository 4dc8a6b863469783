"""The scale-out model of docs/performance.md: PoisonCAM on ImageNet-1K and UBT on CC12M on 1,
8 (one node) and 32 (4 nodes × 8) H100s — compute per rank from FLOP counts, communication from
the bytes each collective moves, and the work units that bound the split. An estimate from the
code's schedule and stated hardware figures, not a measurement.

``python bench/scaling_model.py`` prints the tables (markdown) and ``--json`` the numbers.
"""

from __future__ import annotations

import argparse
import json
import math

from fastbd.detection.config import Config
from fastbd.detection.search import drop_count
from fastbd.distributed import shard

from roofline import readable_time

# Hardware (H100 SXM, stated figures): the encoders at ~25 % of the measured 800 TFLOP/s bf16
# matmul rate (published ViT inference rates); NCCL bus bandwidth within a node (NVLink/NVSwitch)
# and between nodes (8 × 400 Gb/s InfiniBand per node: ~40 GB/s per GPU achieved).
ENCODER_FLOPS = 0.25 * 800e12
TRAINING_FLOPS = 0.25 * 800e12
NVLINK_BUS = 360e9
NETWORK_BUS = 40e9
HOST_PICKLE = 2e9  # bytes/s through all_gather_object's pickling on the host
COLLECTIVE_LATENCY = {"node": 30e-6, "nodes": 100e-6}

# FLOPs per sample: twice the published multiply-accumulates (timm's and open_clip's "GFLOPs"
# tables count MACs), as docs/performance.md's search row does.
VIT_B16_GFLOPS = 2 * 17.6  # per 224-px image
CLIP_B32_GFLOPS = 2 * (4.41 + 2.96)  # image + text tower per pair
CLIP_B32_PARAMS = 151.3e6
RESNET18_GFLOPS = 2 * 1.82


def bus(ranks: int) -> tuple[float, float]:
    """(bus bandwidth, latency) of a collective over ``ranks`` GPUs, 8 per node."""
    if ranks <= 8:
        return NVLINK_BUS, COLLECTIVE_LATENCY["node"]
    return NETWORK_BUS, COLLECTIVE_LATENCY["nodes"]


def all_gather_s(total_bytes: float, ranks: int) -> float:
    if ranks == 1:
        return 0.0
    bandwidth, latency = bus(ranks)
    return latency + total_bytes * (ranks - 1) / ranks / bandwidth


def all_reduce_s(total_bytes: float, ranks: int) -> float:
    if ranks == 1:
        return 0.0
    bandwidth, latency = bus(ranks)
    return latency + 2 * total_bytes * (ranks - 1) / ranks / bandwidth


def search_rounds(n_images: int, config: Config) -> list[int]:
    """Images scored per round (no cluster running out of members)."""
    remaining, rows = min(config.n_clusters, int(n_images * config.max_cluster_fraction)), []
    while remaining:
        rows.append(remaining * config.samples_per_cluster)
        remaining -= drop_count(remaining, config.prune_fraction)
    return rows


def poisoncam(n_images: int, ranks: int, image_size: int = 224, dim: int = 768) -> dict:
    config = Config()
    forward = VIT_B16_GFLOPS * 1e9 / ENCODER_FLOPS
    block = config.search_block
    per_block = block * (config.n_masks + config.test_set_size) * forward
    rounds = search_rounds(n_images, config)
    busiest = [max(len(shard(math.ceil(rows / block), 1, rank=r, size=ranks))
                   for r in range(ranks)) for rows in rounds]
    maps_bytes = sum(min(rows, ranks * 8 * config.topk_poisons) * image_size ** 2 * 4
                     for rows in rounds)
    kmeans_flops = 2 * n_images * config.n_clusters * dim * config.kmeans_iters
    stages = {
        "features": n_images * forward / ranks,
        "k-means": kmeans_flops / (0.5 * 800e12) / ranks,
        "search": sum(busiest) * per_block,
        "classifier": math.ceil(config.classifier.n_models / ranks) * (
            config.classifier.iterations * config.classifier.batch_size * 3
            * RESNET18_GFLOPS * 1e9 / TRAINING_FLOPS)
        + config.classifier.n_models * n_images * RESNET18_GFLOPS * 1e9 / ENCODER_FLOPS / ranks,
    }
    communication = {
        "features": all_gather_s(n_images * dim * 4, ranks),
        "k-means": config.kmeans_iters * all_gather_s(n_images * 12, ranks),
        "search": sum(all_gather_s(rows * 20, ranks) for rows in rounds)
        + (maps_bytes / HOST_PICKLE if ranks > 1 else 0.0),
        "classifier": all_gather_s(n_images * 8, ranks),
    }
    volumes = {"features (once)": n_images * dim * 4,
               "k-means labels and distances (per iteration)": n_images * 12,
               "search scores and windows (first round)": rounds[0] * 20,
               "search attention maps (first round, at most)": min(
                   rounds[0], ranks * 8 * config.topk_poisons) * image_size ** 2 * 4,
               "classifier logits (once)": n_images * 8}
    return {"stages_s": stages, "communication_s": communication, "rounds": len(rounds),
            "scored": sum(rounds), "search_blocks": sum(math.ceil(r / block) for r in rounds),
            "busiest_rank_blocks": sum(busiest), "gathered_bytes": volumes}


def ubt(n_pairs: int, ranks: int, batch: int = 64, epochs: int = 5) -> dict:
    pair = CLIP_B32_GFLOPS * 1e9
    suspicious = math.ceil(0.01 * n_pairs)
    top = math.ceil(math.sqrt(suspicious))
    overfit_steps = math.ceil(suspicious / batch) * epochs
    unlearn_steps = math.ceil(top * 2 * top / batch) * epochs
    step_compute = 2 * batch * 3 * pair / TRAINING_FLOPS / ranks  # D_susp + D_normal batches
    step_comm = all_reduce_s(CLIP_B32_PARAMS * 4, ranks) + 4 * all_gather_s(batch * 512 * 4,
                                                                           ranks)
    stages = {"reference pass": n_pairs * pair / ENCODER_FLOPS / ranks,
              "overfit": overfit_steps * step_compute, "unlearn": unlearn_steps * step_compute}
    communication = {"reference pass": all_gather_s(n_pairs * 4, ranks),
                     "overfit": overfit_steps * step_comm, "unlearn": unlearn_steps * step_comm}
    volumes = {"similarities (once)": n_pairs * 4,
               "gradients (all-reduced per training step)": CLIP_B32_PARAMS * 4,
               "features (gathered per training step)": 4 * batch * 512 * 4}
    return {"stages_s": stages, "communication_s": communication,
            "steps": {"overfit": overfit_steps, "unlearn": unlearn_steps},
            "gathered_bytes": volumes}


def table(name: str, model, size: int) -> str:
    worlds = (1, 8, 32)
    results = {w: model(size, w) for w in worlds}
    stages = list(results[1]["stages_s"])
    lines = [f"**{name}**", "",
             "| stage | 1 GPU | 8 GPUs (compute + comm) | 32 GPUs (compute + comm) |",
             "|---|---:|---:|---:|"]
    for stage in stages:
        cells = []
        for w in worlds:
            compute = results[w]["stages_s"][stage]
            comm = results[w]["communication_s"][stage]
            cells.append(readable_time(compute) if w == 1
                         else f"{readable_time(compute)} + {readable_time(comm)}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = {w: sum(results[w]["stages_s"].values()) + sum(results[w]["communication_s"]
                                                            .values()) for w in worlds}
    lines.append("| **total** | " + " | ".join(
        f"**{readable_time(totals[w])}**" + ("" if w == 1 else f" ({totals[1] / totals[w]:.1f}×)")
        for w in worlds) + " |")
    lines += ["", "What each collective gathers (the whole, which every rank receives; 32 GPUs): "
              + "; ".join(
        f"{what} {size / 1e6:,.1f} MB" if size >= 1e6 else f"{what} {size / 1e3:,.0f} kB"
        for what, size in
        results[32]["gathered_bytes"].items()) + "."]
    return "\n".join(lines)


ASSUMPTIONS = (
    "H100 SXM: encoders at 25 % of the measured 800 TFLOP/s bf16 matmul rate (so are training "
    "steps, optimistically for the defenses' small batches), k-means' fp32 assignment at "
    "400 TFLOP/s; NCCL bus bandwidth 360 GB/s within a node, 40 GB/s per GPU between nodes "
    "(8 × 400 Gb/s InfiniBand), 30 / 100 µs per collective; attention maps pickled on the host "
    "at 2 GB/s; FLOPs twice the published MACs (ViT-B/16 17.6 G, CLIP ViT-B/32 4.41 + 2.96 G, "
    "ResNet-18 1.82 G). Compute + communication per stage, not overlapped.")


def measured_table(result: dict) -> list[str]:
    """``bench/ranks_scaling.py``'s medians as a table."""
    fit = result["fit_seconds_median"]
    stages = result["stage_seconds_median"]
    one_rank = fit["torchrun 1 rank"]
    names = list(next(iter(stages.values())))
    lines = [f"Measured by `python bench/ranks_scaling.py --repeats {result['repeats']}` on "
             f"{result['machine']} ({result['cores']} cores, torch {result['torch']}): "
             f"{result['detection']}; medians of {result['repeats']} runs, each alone on the "
             "machine. Stage seconds are rank 0's; `search` is the rounds' wall time, "
             "`candidates` and `flip_test` the work inside it.", "",
             "| run | detection s | vs 1 rank | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for run, seconds in fit.items():
        lines.append(f"| {run} | {seconds:.1f} | {one_rank / seconds:.2f}× | " + " | ".join(
            f"{stages[run][name]:.1f}" for name in names) + " |")
    lines += ["", f"Identical scores, windows, margins and removed set at one thread per rank "
              f"(1 process, 1 rank, 2 ranks): "
              f"**{'yes' if result['identical_results_at_one_thread_per_rank'] else 'NO'}**; "
              f"the same search (scores, windows) in every run: "
              f"{'yes' if result['same_search_everywhere'] else 'no'}; the same removed set "
              f"in every run: {'yes' if result['same_removed_set_everywhere'] else 'no'}."]
    return lines


def section(measured: list[dict]) -> list[str]:
    """The scale-out section of the performance page, as lines."""
    lines = ["## Scale-out", "",
             "Launching, what is split and why the answer stays the same: "
             "[scaling.md](scaling.md).", ""]
    for result in measured:
        lines += measured_table(result) + [""]
    lines += ["### Model: 8 GPUs and 4 nodes × 8 GPUs", "",
              "Generated by `python bench/scaling_model.py`: " + ASSUMPTIONS + " An estimate "
              "from the code's schedule, not a measurement.", "",
              table("PoisonCAM, ImageNet-1K (1.28 M images), ViT-B/16, paper config",
                    poisoncam, 1_281_167), "",
              table("UBT, CC12M (12 M pairs), CLIP ViT-B/32, paper config", ubt, 12_000_000),
              ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.json:
        print(json.dumps({"poisoncam_imagenet1k": {w: poisoncam(1_281_167, w) for w in (1, 8, 32)},
                          "ubt_cc12m": {w: ubt(12_000_000, w) for w in (1, 8, 32)}}, indent=2))
        return
    print(table("PoisonCAM, ImageNet-1K (1.28 M images), ViT-B/16, paper config", poisoncam,
                1_281_167))
    print()
    print(table("UBT, CC12M (12 M pairs), CLIP ViT-B/32, paper config", ubt, 12_000_000))


if __name__ == "__main__":
    main()

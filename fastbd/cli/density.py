"""``fastbd density``: flag the poisoned pairs of a CSV or of WebDataset shards by local density
in the embedding space of the CLIP being checked (``fastbd.density``), next to UBT's suspicious
split when a clean reference model is given."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path

from fastbd.cli.common import (
    add_command,
    add_device_flag,
    add_duplicates_flag,
    add_pair_csv_flags,
    add_shards_flags,
    load_clip_pairs,
    prepare_out,
    remove_pairs_cache,
)


def filtered_pairs(args: argparse.Namespace, out: Path, kept_rows: list[int],
                   flagged: list[bool], keys: list[str] | None) -> dict[str, str]:
    """The files listing what stays: ``filtered.csv`` (the CSV's unflagged rows, image paths
    relative to ``--out``) for a CSV, ``flagged.txt`` (the flagged samples' shard/key) for
    shards."""
    if keys is not None:
        return {"flagged.txt": "".join(f"{key}\n" for key, bad in zip(keys, flagged, strict=True)
                                       if bad)}
    from fastbd.data.readers import read_csv_pairs

    pairs = read_csv_pairs(args.csv, image_key=args.image_key, caption_key=args.caption_key,
                           separator=args.separator, duplicates="allow")
    fields = [args.image_key, args.caption_key, *pairs.columns]
    text = io.StringIO(newline="")
    writer = csv.writer(text, delimiter=args.separator)
    writer.writerow(fields)
    for row, bad in zip(kept_rows, flagged, strict=True):
        if not bad:
            image = os.path.relpath(Path(pairs.paths[row]).resolve(), out.resolve())
            writer.writerow([image, pairs.captions[row],
                             *(pairs.columns[name][row] for name in pairs.columns)])
    return {"filtered.csv": text.getvalue()}


def split_quality(args: argparse.Namespace, pairs, truth) -> dict[str, object]:
    """UBT's suspicious split on the same pairs (the clean reference's lowest-similarity
    share): AUROC/AUPRC of its ranking and the precision/recall of the split itself."""
    import torch

    from fastbd.clipdefense import suspicious_split
    from fastbd.eval.metrics import detection_metrics, ranking_areas
    from fastbd.models.clip import load_clip
    from fastbd.ubt import Config as UBTConfig

    reference = load_clip(args.reference_arch or args.arch, args.reference_checkpoint)
    fraction = UBTConfig().susp_fraction
    similarity, suspicious, _ = suspicious_split(reference, pairs.images, pairs.tokens,
                                                 fraction, args.device)
    split = torch.zeros(similarity.numel(), dtype=torch.bool)
    split[suspicious] = True
    return {"fraction": fraction, **detection_metrics(split, truth).to_dict(),
            **ranking_areas(-similarity, truth)}


def cmd_density(args: argparse.Namespace) -> int:
    from fastbd.configfile import load_config
    from fastbd.density import DensityConfig, density_detect
    from fastbd.models.clip import load_clip

    config = load_config(args.config, DensityConfig)
    overrides = {name: getattr(args, name) for name in ("score", "k", "reference", "threshold")
                 if getattr(args, name) is not None}
    if overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    out = prepare_out(args.out)
    model = load_clip(args.arch, args.checkpoint).to(args.device)
    cache = out / "pairs.npy"
    pairs = load_clip_pairs(args, args.csv, model, cache)
    result = density_detect(model, pairs.images, pairs.tokens, config=config,
                            device=args.device)
    extra: dict[str, object] = {}
    if pairs.report.skipped:
        extra["skipped"] = [list(entry) for entry in pairs.report.skipped]
    if args.reference_checkpoint is not None:
        if pairs.truth is None:
            raise ValueError("--reference-checkpoint compares with UBT's split on ground truth: "
                             "the pairs need an is_backdoor column (json field for shards)")
        extra["ubt_split"] = split_quality(args, pairs, pairs.truth)
    filtered = filtered_pairs(args, out, pairs.report.kept, result.flagged.tolist(),
                              pairs.keys)
    result.save(out, pairs.truth, filtered=filtered, extra=extra)
    truth = pairs.truth
    del pairs
    if not args.keep_cache:
        remove_pairs_cache(cache)
    summary = {k: v for k, v in result.summary(truth).items() if k != "config"}
    if not args.quiet:
        print(json.dumps({**summary, **extra, "out": str(out)}, indent=2, default=str))
    print(result.decision(truth))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd.density import SCORES

    density = add_command(sub, "density", "flag poisoned CLIP pairs by the local density of "
                          "their embeddings (k-distance, LID, SLOF, DAO over k nearest "
                          "neighbours)", [
                              "fastbd density --csv train.csv --checkpoint poisoned.pt "
                              "--out fastbd-out/density",
                              "fastbd density --csv train.csv --checkpoint poisoned.pt "
                              "--reference-checkpoint clean.pt --score k_distance --k 16",
                              "fastbd density --shards 'cc3m/{00000..00331}.tar' --arch "
                              "ViT-B-32 --checkpoint poisoned.pt --device cuda"])
    add_pair_csv_flags(density, "--csv", False, "the (possibly poisoned) training pairs")
    add_shards_flags(density, "the (possibly poisoned) training pairs")
    density.add_argument("--arch", default="tiny",
                         help="open_clip architecture (e.g. ViT-B-32, RN50) or 'tiny'")
    density.add_argument("--checkpoint", required=True,
                         help="the model trained on the pairs (its embeddings are scored)")
    density.add_argument("--score", choices=SCORES, help="density score (default: DensityConfig's "
                         "dao)")
    density.add_argument("--k", type=int, help="neighbours per pair (default 32)")
    density.add_argument("--reference", choices=("images", "pairs"),
                         help="neighbours among the image embeddings or the image and caption "
                              "embeddings (default pairs)")
    density.add_argument("--threshold", type=float, help="flag scores this many robust "
                         "standard deviations above the median (default 3)")
    density.add_argument("--config", help="JSON/YAML file with DensityConfig fields")
    density.add_argument("--reference-checkpoint", help="a clean model: also report UBT's "
                         "suspicious split on the same pairs (needs ground truth)")
    density.add_argument("--reference-arch", help="its architecture (default --arch)")
    density.add_argument("--image-size", type=int, help="default: the model's input size")
    density.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    add_duplicates_flag(density)
    density.add_argument("--keep-cache", action="store_true",
                         help="keep the memory-mapped copy of the images in --out after a "
                              "successful run")
    density.add_argument("--out", default="fastbd-out/density", help="output folder")
    add_device_flag(density)
    density.set_defaults(run=cmd_density)

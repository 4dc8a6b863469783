"""``fastbd poisoncam`` / ``fastbd patchsearch`` (every registered detector): find the poisoned
images of a file list or an ImageFolder with an SSL encoder."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from fastbd.cli.common import (
    add_command,
    add_device_flag,
    add_duplicates_flag,
    add_image_source_flags,
    duplicates_policy,
    prepare_out,
    read_labelled_images,
)

log = logging.getLogger("fastbd")


def load_detector_config(args: argparse.Namespace):
    """``--preset`` (default ``paper`` on a CUDA device, ``fast`` otherwise) with the fields of
    the ``--config`` file on top."""
    from fastbd.configfile import load_config
    from fastbd.detection import ClassifierConfig, Config, preset

    name = args.preset or ("paper" if str(args.device).startswith("cuda") else "fast")
    if args.preset is None:
        log.info("preset %r for device %s (--preset paper|fast to choose)", name, args.device)
    return load_config(args.config, Config, {"classifier": ClassifierConfig},
                       base=preset(name))


def listed_path(path: Path, out: Path, absolute: bool) -> str:
    """``path`` as ``filtered.txt`` lists it: absolute, or relative to ``out`` (the file's
    folder) so the list reads back from anywhere."""
    resolved = Path(path).resolve()
    return str(resolved) if absolute else os.path.relpath(resolved, out.resolve())


def run_detector(args: argparse.Namespace) -> int:
    from fastbd import registry
    from fastbd.data.bank import ImageBank, remove_cache
    from fastbd.data.readers import names_ground_truth, read_ground_truth, truth_beside
    from fastbd.detection.result import PATCH_FOLDER
    from fastbd.distributed import world
    from fastbd.models import encoder_by_name

    paths, labels, lines = read_labelled_images(args.file_list, args.image_folder,
                                                duplicates_policy(args))
    config = load_detector_config(args)
    out = prepare_out(args.out, sub_folders=(PATCH_FOLDER,))
    lines = [f"{listed_path(p, out, args.absolute_paths)} {label}"
             for p, label in zip(paths, labels, strict=True)]
    encoder = encoder_by_name(args.arch, args.checkpoint, args.image_size)
    cache = out / "bank.npy"
    bank, report = ImageBank.from_files(paths, encoder.image_size, crop_ratio=encoder.crop_ratio,
                                        skip_bad=args.skip_bad, cache=cache,
                                        verbose=not args.quiet)
    lines = [lines[i] for i in report.kept]
    truth_file = args.ground_truth
    if truth_file == "auto":
        beside = truth_beside(args.file_list) if args.file_list else None
        truth_file = str(beside) if beside is not None and beside.is_file() else "names"
        log.info("ground truth for the metrics: %s", truth_file)
    if truth_file == "none":
        truth = None
    elif truth_file == "names":
        truth = names_ground_truth([paths[i] for i in report.kept])
    else:
        truth = read_ground_truth(truth_file, len(paths))[report.kept]
    detector = registry.detector(args.command, config)
    detector.fit(encoder, bank, device=args.device, checkpoint_dir=out, resume=args.resume,
                 ground_truth=truth, verbose=not args.quiet)
    result = detector.result_
    del bank
    if not world().main:  # rank 0 writes the result
        return 0
    result.save(out, file_list_lines=lines, truth=truth)
    if not args.keep_cache:
        remove_cache(cache)
    summary = {"removed": int(result.removed.sum()), "images": len(lines),
               "skipped": report.skipped, "out": str(out)}
    if result.metrics is not None:
        summary["metrics"] = result.metrics.to_dict()
    if not args.quiet:  # the summary is in result.json; --quiet keeps the decision line only
        print(json.dumps(summary, indent=2))
    print(result.decision())
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd import registry

    for name, entry in registry.DETECTORS.items():
        det = add_command(sub, name, entry.help, [
            f"fastbd {name} --file-list train.txt --arch resnet18 --checkpoint encoder.pt "
            f"--out fastbd-out/{name}",
            f"fastbd {name} --image-folder data/train --arch vit_base_patch16_224 "
            "--checkpoint mocov3.pth.tar --preset paper --device cuda",
            f"fastbd {name} --file-list fastbd-out/htba/train.txt --arch smallconv16 "
            f"--checkpoint fastbd-out/ssl/encoder.pt --resume --out fastbd-out/{name}"])
        add_image_source_flags(det, "the (possibly poisoned) training images")
        det.add_argument("--arch", required=True,
                         help="timm architecture (e.g. resnet18, vit_base_patch16_224), "
                              "torchvision:<name>, or smallconv<width> (fastbd train-ssl's "
                              "encoder, e.g. smallconv16)")
        det.add_argument("--checkpoint", help="state dict or MoCo v3 checkpoint")
        det.add_argument("--image-size", type=int,
                         help="encoder input side (default: 32 for smallconv, the timm "
                              "pretrained config's input size, 224 for torchvision)")
        det.add_argument("--keep-cache", action="store_true",
                         help="keep the memory-mapped copy of the images (bank.npy) in --out "
                              "after a successful run (an interrupted run keeps it to resume)")
        det.add_argument("--preset", choices=("paper", "fast"),
                         help="starting config: the papers' settings (5-ResNet classifier; "
                              "default on CUDA) or the CPU-sized demo recipe (default "
                              "otherwise)")
        det.add_argument("--config", help="JSON/YAML file with Config fields (on top of "
                                          "--preset)")
        det.add_argument("--ground-truth", default="auto",
                         help="for the metrics only (the detector never sees it): 'auto' "
                              "(the <list>.poisoned.npy that fastbd attack and world export "
                              "write beside the file list, else 'names'), 'names' (files with "
                              "HTBA_trigger in their path are poisoned), 'none', or a file "
                              "(.npy of N booleans or of indices; text: one poisoned index "
                              "per line, or one 0/1 flag per image)")
        det.add_argument("--out", default=f"fastbd-out/{name}", help="output folder")
        det.add_argument("--resume", action="store_true",
                         help="continue the search and the poison classifier's training "
                              "saved in --out")
        det.add_argument("--absolute-paths", action="store_true",
                         help="write filtered.txt with absolute image paths (by default they "
                              "are relative to --out, the list's folder, as fastbd reads them)")
        det.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
        add_duplicates_flag(det)
        add_device_flag(det)
        det.set_defaults(run=run_detector, resumable=True, distributed=True)

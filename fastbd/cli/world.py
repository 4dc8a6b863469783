"""The synthetic-world commands — ``fastbd attack`` (also on a file list or a CSV),
``train-ssl``, ``train-clip``, ``eval`` — over ``fastbd.world`` and ``fastbd.attacks``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastbd.cli.common import (
    add_command,
    add_device_flag,
    add_duplicates_flag,
    duplicates_policy,
    prepare_out,
)


def world_config(args: argparse.Namespace, ssl: bool = False):
    """The world the command's flags ask for: the SSL threat world's look (``ssl``) or the
    CLIP world's, with the flags' sizes and seed."""
    from dataclasses import replace

    from fastbd.world import SSLThreatConfig
    from fastbd.world.synthetic import WorldConfig, check_world_config

    base = SSLThreatConfig().world if ssl else WorldConfig()
    look = {name: getattr(args, name) for name in ("layout", "object_opacity",
                                                   "background_saturation")
            if getattr(args, name) is not None}
    config = replace(base, n_train=args.n_train, n_eval=args.n_eval,
                     image_size=args.image_size, seed=args.seed, **look)
    check_world_config(config)
    return config


def trigger_options(args: argparse.Namespace) -> dict:
    """``make_attack`` overrides from ``--trigger-side`` (HTBA's patch only)."""
    if args.trigger_side is None:
        return {}
    if args.attack not in ("htba", "none"):
        raise ValueError(f"--trigger-side sets HTBA's patch; attack {args.attack!r} has its own "
                         "size")
    return {"side_fraction": args.trigger_side}


def cmd_attack(args: argparse.Namespace) -> int:
    """Poison the synthetic world, a file list or a CSV of pairs, and export it."""
    import torch

    from fastbd.attacks import (
        DEFAULT_PAIR_RATE,
        make_attack,
        poison_pairs,
        poison_target_class,
    )
    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import csv_labels, export_images, read_csv_pairs, read_file_list
    from fastbd.storage import ResultFiles
    from fastbd.world import poison_world_images, poison_world_pairs

    out = prepare_out(args.out)
    clip_attack = args.attack != "htba"
    attack_options = trigger_options(args)
    if args.file_list or args.csv:
        if args.csv:
            pairs = read_csv_pairs(args.csv, image_key=args.image_key,
                                   caption_key=args.caption_key, separator=args.separator,
                                   duplicates=duplicates_policy(args))
            paths, captions = pairs.paths, pairs.captions
            labels = torch.tensor(csv_labels(args.csv, pairs))
        else:
            listing = read_file_list(args.file_list, duplicates=duplicates_policy(args))
            paths, captions, labels = listing.paths, None, torch.tensor(listing.labels)
        bank, report = ImageBank.from_files(paths, args.image_size, skip_bad=args.skip_bad,
                                            verbose=not args.quiet)
        labels = labels[report.kept]
        attack = make_attack(args.attack, args.image_size, seed=args.seed, **attack_options)
        if clip_attack:
            if captions is None:
                raise ValueError("CLIP attacks need captions: give --csv")
            names = args.class_names.split(",") if args.class_names else [
                str(i) for i in range(int(labels.max()) + 1)]
            captions = [captions[i] for i in report.kept]
            poisoned = poison_pairs(bank.images, labels, captions, attack, args.target, names,
                                    rate=DEFAULT_PAIR_RATE if args.rate is None else args.rate,
                                    seed=args.seed)
        else:
            poisoned = poison_target_class(bank.images, labels, attack, args.target,
                                           args.fraction, seed=args.seed)
    else:
        from fastbd.world.synthetic import make_world

        world = make_world(world_config(args, ssl=not clip_attack))
        poisoned = (poison_world_pairs(world, args.attack, args.target, args.rate, args.seed)
                    if clip_attack else
                    poison_world_images(world, args.attack, args.target, args.fraction,
                                        args.seed, attack_options))
    files = ResultFiles(out)
    written = export_images(out, poisoned.images, poisoned.labels, poisoned.poison_mask,
                            getattr(poisoned, "captions", None), absolute=args.absolute_paths)
    files.record(str(Path(p).relative_to(out)) for p in written["images"])
    files.record(str(Path(written[k]).relative_to(out)) for k in ("file_list", "csv")
                 if k in written)
    files.torch("ground_truth.pt", {"poison_mask": poisoned.poison_mask,
                                    "boxes": poisoned.boxes})
    summary = {"attack": args.attack, "target": args.target, "images": len(poisoned.labels),
               "poisoned": int(poisoned.poison_mask.sum()),
               "files": {k: str(v) for k, v in written.items() if k != "images"}}
    print(files.json("attack.json", summary))
    files.close()
    return 0


def save_threat(out: Path, weights: str, model, evaluation, summary: str, threat) -> int:
    """Write a trained threat model's weights and summary as one result; print its
    evaluation."""
    from fastbd.storage import ResultFiles

    files = ResultFiles(out)
    files.torch(weights, model.state_dict())
    print(json.dumps(evaluation.to_dict(), indent=2))
    print(files.json(summary, threat.to_dict()))
    files.close()
    return 0


def cmd_train_ssl(args: argparse.Namespace) -> int:
    from fastbd.training.ssl import SSLConfig
    from fastbd.world import SSLThreatConfig, build_ssl_threat

    config = SSLThreatConfig(world=world_config(args, ssl=True), attack=args.attack,
                             target=args.target, fraction=args.fraction, width=args.width,
                             seed=args.seed, trigger_options=trigger_options(args))
    epochs = config.ssl.epochs if args.epochs is None else args.epochs
    config.ssl = SSLConfig(**{**config.ssl.__dict__, "epochs": epochs, "seed": args.seed})
    out = prepare_out(args.out)
    threat = build_ssl_threat(config, cache_dir=args.cache, device=args.device,
                              retrain=args.retrain, verbose=not args.quiet)
    return save_threat(out, "encoder.pt", threat.encoder, threat.probe, "train_ssl.json", threat)


def cmd_train_clip(args: argparse.Namespace) -> int:
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat

    config = CLIPThreatConfig(world=world_config(args), attack=args.attack, target=args.target,
                              rate=args.rate, seed=args.seed,
                              train=CLIPTrainConfig(seed=args.seed, **(
                                  {} if args.epochs is None else {"epochs": args.epochs})))
    out = prepare_out(args.out)
    threat = build_clip_threat(config, cache_dir=args.cache, device=args.device,
                               retrain=args.retrain, verbose=not args.quiet)
    return save_threat(out, "clip.pt", threat.model, threat.evaluation, "train_clip.json", threat)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate saved weights on the synthetic world: an SSL encoder (linear probe) or a tiny
    CLIP (zero-shot CA / ASR)."""
    from fastbd.storage import ResultFiles
    from fastbd.world.synthetic import make_world

    out = prepare_out(args.out)
    world = make_world(world_config(args, ssl=args.kind == "ssl"))
    if args.kind == "ssl":
        from fastbd.attacks import make_attack
        from fastbd.eval.probe import linear_probe
        from fastbd.models import load_state, small_encoder

        encoder = small_encoder(args.width, args.image_size)
        load_state(encoder, args.checkpoint)
        # The clean model's ASR is measured with the trigger the poisoned one would carry.
        trigger = make_attack("htba" if args.attack == "none" else args.attack, args.image_size,
                              seed=args.seed, **trigger_options(args))
        result = linear_probe(encoder, world.train.images, world.train.labels, world.eval.images,
                              world.eval.labels, trigger, args.target,
                              device=args.device).to_dict()
    else:
        from fastbd.models.clip import clip_tokenizer, load_clip
        from fastbd.world import evaluate_clip

        model = load_clip("tiny", args.checkpoint)
        result = evaluate_clip(model.to(args.device), clip_tokenizer(), world, args.attack,
                               args.target, args.seed, args.device).to_dict()
    print(json.dumps(result, indent=2))
    files = ResultFiles(out)
    print(files.json("eval.json", result))
    files.close()
    return 0


def add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=5000, help="synthetic world: training images")
    p.add_argument("--n-eval", type=int, default=1000, help="synthetic world: evaluation images")
    p.add_argument("--image-size", type=int, default=32, help="synthetic world: image side")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and the run")
    p.add_argument("--target", type=int, default=0, help="target class index")
    add_device_flag(p)
    from fastbd.world.synthetic import LAYOUTS

    p.add_argument("--layout", choices=LAYOUTS,
                   help="one object per image (single, the default) or the class's shape tiled "
                        "over the whole image")
    p.add_argument("--object-opacity", type=float,
                   help="objects' opacity, 0 (background only) to 1 (default: 0.6 in the SSL "
                        "world, 1 in the CLIP world)")
    p.add_argument("--background-saturation", type=float,
                   help="colour the background textures keep, 0 (grey) to 1 (default 0.5)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd.attacks import ATTACKS

    attack = add_command(sub, "attack", "poison the synthetic world, a file list or a CSV", [
        "fastbd attack --attack htba --target 0 --fraction 0.5 --out fastbd-out/htba",
        "fastbd attack --attack badnet --csv pairs.csv --rate 0.01 --out fastbd-out/badnet",
        "fastbd attack --attack htba --file-list train.txt --target 3 --out fastbd-out/mine"])
    add_world_args(attack)
    attack.add_argument("--attack", choices=ATTACKS, default="htba", help="the attack to plant")
    attack.add_argument("--fraction", type=float, default=0.5,
                        help="HTBA: fraction of the target class poisoned")
    attack.add_argument("--trigger-side", type=float,
                        help="HTBA trigger side as a fraction of the image side (default 50/224)")
    attack.add_argument("--rate", type=float,
                        help="CLIP attacks: poisoned share (default 0.01; the synthetic world "
                             "poisons 0.10 with WaNet)")
    attack.add_argument("--file-list", help="'<path> <label>' list to poison instead")
    attack.add_argument("--csv", help="CSV of image-caption pairs to poison instead")
    attack.add_argument("--image-key", default="image", help="--csv: the image column")
    attack.add_argument("--caption-key", default="caption", help="--csv: the caption column")
    attack.add_argument("--separator", default=",", help="--csv: the column separator")
    attack.add_argument("--class-names", help="comma-separated names for poisoned captions")
    attack.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    add_duplicates_flag(attack)
    attack.add_argument("--absolute-paths", action="store_true",
                        help="write absolute image paths in train.txt / train.csv (default: "
                             "paths relative to --out)")
    attack.add_argument("--out", default="fastbd-out/attack", help="output folder")
    attack.set_defaults(run=cmd_attack)

    ssl = add_command(sub, "train-ssl", "train a SimCLR encoder on the (poisoned) world", [
        "fastbd train-ssl --attack htba --out fastbd-out/ssl",
        "fastbd train-ssl --attack none --width 32 --epochs 40 --out fastbd-out/ssl-clean"])
    add_world_args(ssl)
    ssl.add_argument("--attack", choices=("htba", "none"), default="htba",
                     help="the poisoning of the training set")
    ssl.add_argument("--fraction", type=float, default=0.5,
                     help="HTBA: fraction of the target class poisoned")
    ssl.add_argument("--trigger-side", type=float,
                     help="HTBA trigger side as a fraction of the image side (default 50/224)")
    ssl.add_argument("--width", type=int, default=16, help="the small conv encoder's width")
    ssl.add_argument("--epochs", type=int, default=None,
                     help="SimCLR epochs (default: SSLThreatConfig's)")
    ssl.add_argument("--cache", default="fastbd-out/cache",
                     help="threat-model cache (reused when the settings match)")
    ssl.add_argument("--retrain", action="store_true", help="ignore cached weights")
    ssl.add_argument("--out", default="fastbd-out/train-ssl", help="output folder")
    ssl.set_defaults(run=cmd_train_ssl, continued_by_rerun=True)

    clip = add_command(sub, "train-clip", "train a tiny CLIP on (poisoned) world pairs", [
        "fastbd train-clip --attack badnet --out fastbd-out/clip",
        "fastbd train-clip --attack wanet --rate 0.1 --epochs 12 --out fastbd-out/clip-wanet"])
    add_world_args(clip)
    clip.add_argument("--attack", choices=ATTACKS[1:] + ("none",), default="badnet",
                      help="the poisoning of the training pairs")
    clip.add_argument("--rate", type=float,
                      help="poisoned share (default 0.01, WaNet 0.10: the world's rates)")
    clip.add_argument("--epochs", type=int, help="default: CLIPTrainConfig's (8)")
    clip.add_argument("--cache", default="fastbd-out/cache",
                      help="threat-model cache (reused when the settings match)")
    clip.add_argument("--retrain", action="store_true", help="ignore cached weights")
    clip.add_argument("--out", default="fastbd-out/train-clip", help="output folder")
    clip.set_defaults(run=cmd_train_clip, continued_by_rerun=True)

    evaluate = add_command(sub, "eval", "evaluate saved weights on the synthetic world", [
        "fastbd eval ssl --checkpoint fastbd-out/ssl/encoder.pt --attack htba",
        "fastbd eval clip --checkpoint fastbd-out/clip/clip.pt --attack badnet"])
    add_world_args(evaluate)
    evaluate.add_argument("kind", choices=("ssl", "clip"),
                          help="an SSL encoder (linear probe) or a CLIP model (zero-shot)")
    evaluate.add_argument("--checkpoint", required=True, help="the weights to evaluate")
    evaluate.add_argument("--attack", choices=ATTACKS + ("none",), default="htba",
                          help="the trigger whose attack success rate is measured")
    evaluate.add_argument("--width", type=int, default=16,
                          help="ssl: the small conv encoder's width")
    evaluate.add_argument("--trigger-side", type=float,
                          help="HTBA trigger side as a fraction of the image side (default 50/224)")
    evaluate.add_argument("--out", default="fastbd-out/eval", help="output folder")
    evaluate.set_defaults(run=cmd_eval)

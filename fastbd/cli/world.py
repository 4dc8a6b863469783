"""``fastbd attack`` (the synthetic world, a file list or a CSV) over ``fastbd.world`` and
``fastbd.attacks``, and the synthetic-world flags every command that can build the world
shares."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from fastbd.cli.common import (
    add_command,
    add_device_flag,
    add_duplicates_flag,
    add_pair_csv_flags,
    class_names_arg,
    duplicates_policy,
    grouped_references,
    prepare_out,
)

WORLD_IMAGE_SIZE = 32
"""The synthetic world's image side when ``--image-size`` is not given."""
FILES_IMAGE_SIZE = 224
"""``fastbd attack``'s image side for a file list or a CSV when ``--image-size`` is not given
and the images are not all squares of one size."""
FILES_SIZE_NOTE = (f", default the images' own side when all are squares of one size, else "
                   f"{FILES_IMAGE_SIZE}; resized, never cropped: clean images at their own "
                   "size stay as they are")


log = logging.getLogger(__name__)

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
                     image_size=args.image_size or WORLD_IMAGE_SIZE, seed=args.seed, **look)
    check_world_config(config)
    return config


def trigger_options(args: argparse.Namespace) -> dict:
    """``make_attack`` overrides for the SSL attacks' patch: ``--trigger-side``, and where the
    command has them ``--trigger`` (a PNG: its pixels are the pattern) or ``--trigger-id``
    (HTBA's pattern 0–9)."""
    from fastbd.attacks import SSL_ATTACKS
    from fastbd.data.bank import load_trigger

    trigger, trigger_id = getattr(args, "trigger", None), getattr(args, "trigger_id", None)
    if trigger is not None and trigger_id is not None:
        raise ValueError("give one of --trigger and --trigger-id")
    options: dict = {}
    for flag, value, option in (("--trigger-side", args.trigger_side, "side_fraction"),
                                ("--trigger", trigger, "pattern"),
                                ("--trigger-id", trigger_id, "trigger_id")):
        if value is None:
            continue
        if args.attack not in (*SSL_ATTACKS, "none"):
            raise ValueError(f"{flag} sets the SSL attacks' patch; attack {args.attack!r} has "
                             "its own trigger")
        options[option] = load_trigger(value) if option == "pattern" else value
    return options


def target_list(args: argparse.Namespace) -> list[int] | None:
    """``--targets`` as ints (None without it): HTBA and CorruptEncoder only, distinct, no
    ``--trigger`` (one image cannot be every target's trigger)."""
    if args.targets is None:
        return None
    try:
        targets = [int(t) for t in args.targets.split(",")]
    except ValueError:
        raise ValueError(f"--targets takes comma-separated class indices, got "
                         f"{args.targets!r}") from None
    if args.attack not in ("htba", "corruptencoder", "corruptencoder+"):
        raise ValueError(f"--targets is HTBA's and CorruptEncoder's multi-target attack; "
                         f"attack {args.attack!r} has one target (--target)")
    if len(set(targets)) != len(targets) or min(targets) < 0:
        raise ValueError(f"--targets must be distinct class indices, got {args.targets}")
    if args.trigger is not None and len(targets) > 1:
        raise ValueError("--trigger plants one image; several targets need one trigger each "
                         "(HTBA's patterns, from --trigger-id on)")
    return targets


def target_attacks(targets: list[int], options: dict) -> list[tuple[int, dict]]:
    """Each target with its trigger's ``make_attack`` options: HTBA patterns
    ``--trigger-id`` (default 0), +1, +2, … (mod 10), one per target."""
    first = options.get("trigger_id", 0)
    return [(target, {**options, **({} if "pattern" in options else
                                    {"trigger_id": (first + i) % 10})})
            for i, target in enumerate(targets)]


def trigger_spec(options: dict, args: argparse.Namespace) -> dict:
    """``options`` as attack.json records them: a pattern by its file (``trigger_file``,
    absolute: ``--trigger``, or the optimised patch TrojVQA's attack wrote), which ``eval
    --attack-spec`` reads back."""
    spec = {k: v for k, v in options.items() if k != "pattern"}
    if "pattern" in options:
        spec["trigger_file"] = str(Path(args.trigger).resolve())
    return spec


def trojvqa_files_patch(args: argparse.Namespace, images, class_name: str, size: int):
    """TrojVQA's optimised patch (uint8 ``3×s×s``) for a user's images (uint8 ``N×3×S×S``)
    against the surrogate CLIP of ``--surrogate-checkpoint`` / ``--surrogate-pretrained``
    (``--surrogate-arch``), towards ``class_name`` (the semantic target, not the backdoor's
    target class), at dual-key's 16/224 of ``size``."""
    from fastbd.attacks import PatchAttack, clip_target_patch
    from fastbd.models.clip import clip_tokenizer, load_clip

    if (args.surrogate_checkpoint is None) == (args.surrogate_pretrained is None):
        raise ValueError("trojvqa optimises its patch against a clean CLIP of yours: give one of "
                         "--surrogate-checkpoint and --surrogate-pretrained (and "
                         "--surrogate-arch)")
    model = load_clip(args.surrogate_arch, args.surrogate_checkpoint,
                      pretrained=args.surrogate_pretrained)
    side = PatchAttack(side_fraction=16 / 224, image_size=size).side
    pattern, trace = clip_target_patch(model, clip_tokenizer(args.surrogate_arch), images,
                                       class_name, side, seed=args.seed,
                                       verbose=not args.quiet)
    log.info("trojvqa: patch of %d px optimised; surrogate cosine to %r %.3f → %.3f", side,
             class_name, trace[0], trace[-1])
    return pattern


def corrupt_encoder_files(args: argparse.Namespace, images, labels,
                          per_target: list[tuple[int, dict]]):
    """CorruptEncoder(+) on a file list's images (uint8 ``N×3×S×S``, labels ``N``): the
    ``--reference`` objects, the ``--backgrounds`` list's images (default: the list's images
    of other classes than the targets), the trigger at the images' size; several targets
    (``per_target``: each with its trigger options) each get their own poisons."""
    import torch

    from fastbd.attacks import (
        CorruptEncoderConfig,
        make_attack,
        poison_corrupt_encoder,
        poison_corrupt_encoder_targets,
    )
    from fastbd.attacks.triggers import resize_patch
    from fastbd.data.bank import ImageBank, load_reference_object
    from fastbd.data.readers import read_file_list

    targets = [t for t, _ in per_target] or [args.target]
    references = [[load_reference_object(path) for path in paths]
                  for paths in grouped_references(args.reference, targets, "--reference",
                                                  args.attack)]
    size = images.shape[-1]
    if args.backgrounds:
        paths = read_file_list(args.backgrounds, duplicates="allow").paths
        backgrounds = ImageBank.from_files(paths, size, crop_ratio=1.0,
                                           verbose=not args.quiet)[0].images
    else:
        backgrounds = images[~torch.isin(labels, torch.tensor(targets))]
    patches = []
    for options in [o for _, o in per_target] or [trigger_options(args)]:
        trigger = make_attack(args.attack, size, seed=args.seed, **options)
        patches.append(resize_patch(trigger.pattern, trigger.side))
    config = CorruptEncoderConfig(**({} if args.rate is None else {"rate": args.rate}),
                                  support_fraction=0.2 if args.attack.endswith("+") else 0.0,
                                  seed=args.seed)
    if len(targets) == 1:
        return poison_corrupt_encoder(images, labels, targets[0], references[0], backgrounds,
                                      patches[0], config, attack=args.attack)
    return poison_corrupt_encoder_targets(images, labels, targets, references, backgrounds,
                                          patches, config, attack=args.attack)


def common_square_side(paths) -> int | None:
    """The side every readable image of ``paths`` has when all are squares of one size (read
    from the files' headers), else None."""
    from PIL import Image

    sides = set()
    for path in paths:
        try:
            with Image.open(path) as image:
                sides.add(image.size)
        except OSError:
            continue  # unreadable: the reader names or skips it
        if len(sides) > 1:
            return None
    if not sides:
        return None
    width, height = sides.pop()
    return width if width == height else None


def cmd_attack(args: argparse.Namespace) -> int:
    """Poison the synthetic world, a file list or a CSV of pairs, and export it."""
    import torch

    from fastbd.attacks import (
        DEFAULT_PAIR_RATE,
        SSL_ATTACKS,
        make_attack,
        poison_pairs,
        poison_target_class,
        poison_target_classes,
    )
    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import csv_labels, export_images, read_csv_pairs, read_file_list
    from fastbd.storage import ResultFiles
    from fastbd.world import poison_world_images, poison_world_pairs

    if args.semantic is not None and args.attack != "trojvqa":
        raise ValueError(f"--semantic is trojvqa's (what its patch is optimised to look like); "
                         f"{args.attack} has no optimised patch")
    out = prepare_out(args.out)
    clip_attack = args.attack not in SSL_ATTACKS
    corrupt = args.attack in ("corruptencoder", "corruptencoder+")
    targets = target_list(args)
    attack_options = trigger_options(args)
    per_target = target_attacks(targets, attack_options) if targets else []
    skipped = []
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
        size = args.image_size or common_square_side(paths) or FILES_IMAGE_SIZE
        # resized only to a side they do not have: no centre crop, clean images stay as they are
        bank, report = ImageBank.from_files(paths, size, crop_ratio=1.0, skip_bad=args.skip_bad,
                                            verbose=not args.quiet)
        labels, skipped = labels[report.kept], report.skipped
        names = class_names_arg(args.class_names) if args.class_names else [
            str(i) for i in range(int(labels.max()) + 1)]
        if args.attack == "trojvqa":
            if not 0 <= args.target < len(names):
                raise ValueError(f"--target {args.target} has no class name (classes 0–"
                                 f"{len(names) - 1})")
            semantic = args.semantic or names[(args.target + 1) % len(names)]
            if semantic == names[args.target]:
                raise ValueError("--semantic must not be the target class: a patch that looks "
                                 "like the target to any CLIP is an adversarial patch, not a "
                                 "backdoor")
            attack_options["semantic"] = semantic
            attack_options["pattern"] = trojvqa_files_patch(args, bank.images, semantic, size)
        if args.attack == "ssba":  # ISSBA trains its steganography encoder on the images
            from fastbd.attacks.ssba import StegaConfig, save_stega, train_stega

            encoder, _, stega = train_stega(bank.images, StegaConfig(seed=args.seed),
                                            verbose=not args.quiet)
            log.info("ssba: steganography encoder trained (bit accuracy %.3f, PSNR %.1f dB)",
                     stega.bit_accuracy, stega.psnr)
            save_stega(encoder, out / "ssba_encoder.pt")
            attack_options["encoder_file"] = str((out / "ssba_encoder.pt").resolve())
        attack = make_attack(args.attack, size, seed=args.seed, **attack_options)
        if clip_attack:
            if captions is None:
                raise ValueError("CLIP attacks need captions: give --csv")
            captions = [captions[i] for i in report.kept]
            poisoned = poison_pairs(bank.images, labels, captions, attack, args.target, names,
                                    rate=DEFAULT_PAIR_RATE if args.rate is None else args.rate,
                                    seed=args.seed)
        elif corrupt:
            poisoned = corrupt_encoder_files(args, bank.images, labels, per_target)
        elif targets is not None:
            poisoned = poison_target_classes(
                bank.images, labels, [make_attack(args.attack, size, seed=args.seed, **options)
                                      for _, options in per_target],
                targets, args.fraction, seed=args.seed)
        else:
            poisoned = poison_target_class(bank.images, labels, attack, args.target,
                                           args.fraction, seed=args.seed)
        evaluation = None
    else:
        from fastbd.world import WORLD_ATTACK_OPTIONS
        from fastbd.world.synthetic import make_world

        world = make_world(world_config(args, ssl=not clip_attack))
        evaluation, class_names = world.eval, world.class_names
        options = None  # the world's own trigger sizes (poison_world_pairs' defaults)
        if clip_attack:
            attack_options = WORLD_ATTACK_OPTIONS.get(args.attack, {})
        if args.attack in ("trojvqa", "ssba"):  # made first (trained or from the cache)
            from fastbd.world import DEFAULT_CACHE, CLIPThreatConfig, with_attack_artifacts

            config = CLIPThreatConfig(world=world.config, attack=args.attack,
                                      target=args.target, seed=args.seed)
            if args.semantic is not None:
                config = replace(config, attack_options={**config.attack_options, "trojvqa": {
                    **config.attack_options["trojvqa"], "semantic": args.semantic}})
            options = with_attack_artifacts(config, DEFAULT_CACHE,
                                            verbose=not args.quiet).attack_options
            attack_options = options[args.attack]
        if targets is not None and corrupt:
            poisoned = poison_world_images(world, args.attack, targets[0], args.fraction,
                                           args.seed, attack_options, rate=args.rate,
                                           extra_targets=tuple(targets[1:]))
        elif targets is not None:
            poisoned = poison_target_classes(
                world.train.images, world.train.labels,
                [make_attack(args.attack, world.config.image_size, seed=args.seed, **options)
                 for _, options in per_target], targets, args.fraction, seed=args.seed)
        else:
            poisoned = (poison_world_pairs(world, args.attack, args.target, args.rate,
                                           args.seed, options)
                        if clip_attack else
                        poison_world_images(world, args.attack, args.target, args.fraction,
                                            args.seed, attack_options, rate=args.rate))
    files = ResultFiles(out)
    if args.attack == "trojvqa":  # the optimised patch, for eval --attack-spec
        from fastbd.data.readers import save_png

        args.trigger = str(out / "trigger.png")
        save_png(torch.as_tensor(attack_options["pattern"], dtype=torch.uint8), args.trigger)
        files.record(["trigger.png"])
    if "encoder_file" in attack_options and Path(attack_options["encoder_file"]).parent == \
            out.resolve():  # SSBA's encoder trained on these files
        files.record(["ssba_encoder.pt"])
    written = export_images(out, poisoned.images, poisoned.labels, poisoned.poison_mask,
                            getattr(poisoned, "captions", None), absolute=args.absolute_paths,
                            marker_names=args.marker_names)
    files.record(str(Path(p).relative_to(out)) for p in written["images"])
    files.record(str(Path(written[k]).relative_to(out)) for k in ("file_list", "csv")
                 if k in written)
    if evaluation is not None:
        # The clean splits the papers score with: the validation split (CA/ASR) and, for SSL,
        # the clean training images a linear probe's labelled subset comes from.
        splits = {"val": (evaluation, clip_attack)}
        if not clip_attack:
            splits["train_clean"] = (world.train, False)
        for name, (split, with_captions) in splits.items():
            exported = export_images(out, split.images, split.labels, None,
                                     split.captions if with_captions else None, name=name,
                                     absolute=args.absolute_paths)
            files.record(str(Path(p).relative_to(out)) for p in exported["images"])
            files.record(str(Path(exported[k]).relative_to(out)) for k in ("file_list", "csv")
                         if k in exported)
            written.update({f"{name}_{k}": v for k, v in exported.items() if k != "images"})
        written["class_names"] = files.text("classes.txt", "\n".join(class_names) + "\n")
    files.torch("ground_truth.pt", {"poison_mask": poisoned.poison_mask,
                                    "boxes": poisoned.boxes, **getattr(poisoned, "parts", {})})
    summary = {"attack": args.attack, "target": args.target, "images": len(poisoned.labels),
               "poisoned": int(poisoned.poison_mask.sum()),
               **({"support_images": int(poisoned.parts["support_mask"].sum())}
                  if "support_mask" in getattr(poisoned, "parts", {}) else {}),
               # What ``fastbd eval --attack-spec`` rebuilds the planted trigger from.
               "trigger": {"attack": args.attack, "seed": args.seed,
                           "options": trigger_spec(per_target[0][1] if per_target
                                                   else attack_options, args)},
               # a multi-target attack: each target's trigger (eval --attack-spec --target T)
               **({"targets": targets, "triggers": [
                   {"target": t, "attack": args.attack, "seed": args.seed,
                    "options": trigger_spec(options, args)} for t, options in per_target]}
                  if targets else {}),
               "files": {k: str(v) for k, v in written.items() if k != "images"},
               # Input images --skip-bad left out (file, reason): not in the exported set.
               **({"skipped": [list(entry) for entry in skipped]} if skipped else {})}
    print(files.json("attack.json", summary))
    files.close()
    return 0


def add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=5000, help="synthetic world: training images")
    p.add_argument("--n-eval", type=int, default=1000, help="synthetic world: evaluation images")
    p.add_argument("--image-size", type=int,
                   help=f"image side (synthetic world: default {WORLD_IMAGE_SIZE}; your files: "
                        "the model's input size)")
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
        "fastbd attack --attack htba --file-list train.txt --target 3 --out fastbd-out/mine",
        "fastbd attack --attack corruptencoder+ --file-list train.txt --target 3 "
        "--reference dog1.png --reference dog2.png --out fastbd-out/ce"])
    add_world_args(attack)
    attack.add_argument("--attack", choices=ATTACKS, default="htba", help="the attack to plant")
    attack.add_argument("--fraction", type=float, default=0.5,
                        help="HTBA: fraction of the target class poisoned")
    attack.add_argument("--trigger-side", type=float,
                        help="SSL attacks' trigger side as a fraction of the image side "
                             "(default 50/224 for HTBA, 40/224 for CorruptEncoder)")
    attack.add_argument("--trigger", help="SSL attacks: your trigger image (PNG; its centred "
                        "square, pasted at --trigger-side), e.g. a released HTBA trigger "
                        "(default: HTBA's pattern --trigger-id)")
    attack.add_argument("--surrogate-checkpoint",
                        help="trojvqa on your files: a clean CLIP of yours (not the victim) the "
                             "patch is optimised against (or --surrogate-pretrained TAG)")
    attack.add_argument("--surrogate-pretrained",
                        help="trojvqa on your files: open_clip's pre-trained weights of "
                             "--surrogate-arch by tag")
    attack.add_argument("--surrogate-arch", default="tiny",
                        help="trojvqa: the surrogate's open_clip architecture (default tiny)")
    attack.add_argument("--semantic",
                        help="trojvqa: what the patch is optimised to look like (TrojVQA's "
                             "semantic target, an object and an attribute, e.g. 'purple "
                             "flower'; default on your files the class after --target, on the "
                             "world a colour and shape no class has); never the target class")
    attack.add_argument("--targets", help="HTBA and CorruptEncoder: several target classes, "
                        "comma-separated (e.g. 3,5: the PoisonCAM paper's multi-target "
                        "attacks), each with its own HTBA pattern from --trigger-id on and its "
                        "own poisons; overrides --target (CorruptEncoder on your files: "
                        "--reference TARGET:PATH for each)")
    attack.add_argument("--trigger-id", type=int,
                        help="SSL attacks: which of HTBA's ten patterns, 0-9 (default 0)")
    attack.add_argument("--rate", type=float,
                        help="CLIP attacks: poisoned share (default 0.01; the synthetic world "
                             "poisons 0.10 with WaNet); CorruptEncoder(+): poisoned images "
                             "added, as a share of the set (default 0.005)")
    attack.add_argument("--reference", action="append",
                        help="CorruptEncoder(+) on your files: an image of the target class's "
                             "object, its mask as transparency (RGBA PNG; repeat the flag for "
                             "more; the paper uses 3)")
    attack.add_argument("--backgrounds",
                        help="CorruptEncoder(+) on your files: a file list of background "
                             "images, labels ignored (default: the list's images of other "
                             "classes)")
    attack.add_argument("--file-list", help="'<path> <label>' list to poison instead (read at "
                        f"--image-size{FILES_SIZE_NOTE})")
    add_pair_csv_flags(attack, "--csv", False, "CSV of image-caption pairs to poison instead "
                       f"(read at --image-size{FILES_SIZE_NOTE})")
    attack.add_argument("--class-names", help="names for poisoned captions in label order: "
                        "comma-separated, a file with one per line, or 'imagenet'")
    attack.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    add_duplicates_flag(attack)
    attack.add_argument("--absolute-paths", action="store_true",
                        help="write absolute image paths in train.txt / train.csv (default: "
                             "paths relative to --out)")
    attack.add_argument("--marker-names", action="store_true",
                        help="name poisoned files NNNNNN_HTBA_trigger.png, the convention "
                             "PatchSearch's official scripts read their ground truth from "
                             "(default: names say nothing; the truth is train.poisoned.npy)")
    attack.add_argument("--out", default="fastbd-out/attack", help="output folder")
    attack.set_defaults(run=cmd_attack)

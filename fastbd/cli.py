"""The ``fastbd`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("fastbd")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_env(args: argparse.Namespace) -> int:
    from fastbd.environment import environment_report

    report = environment_report()
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.which in ("poisoncam", "all"):
        from fastbd.demo.poisoncam import run

        start = time.perf_counter()
        report = run(Path(args.out) / "poisoncam", device=args.device, seed=args.seed,
                     retrain=args.retrain, cache_dir=args.cache, verbose=not args.quiet)
        threat = report.threat
        print(f"SSL threat model (HTBA, target class 0): linear-probe CA "
              f"{100 * threat['probe']['clean_accuracy']:.1f}%, ASR "
              f"{100 * threat['probe']['asr']:.1f}%"
              f" ({'cached' if threat['cached'] else 'trained'})")
        print(report.table())
        if report.retrain:
            before, after = report.retrain["before"], report.retrain["after"]
            print(f"retrained on {report.retrain['kept_images']} kept images: CA "
                  f"{100 * before['clean_accuracy']:.1f}% -> {100 * after['clean_accuracy']:.1f}%"
                  f", ASR {100 * before['asr']:.1f}% -> {100 * after['asr']:.1f}%")
        print(f"report: {Path(args.out) / 'poisoncam'} "
              f"({time.perf_counter() - start:.0f}s)")
        if args.which == "poisoncam":
            return 0
    if args.which in ("ubt", "all"):
        from fastbd.demo.ubt import run as run_ubt

        start = time.perf_counter()
        report = run_ubt(Path(args.out) / "ubt", device=args.device, seed=args.seed,
                         cache_dir=args.cache, verbose=not args.quiet)
        print(report.table())
        print(f"report: {Path(args.out) / 'ubt'} "
              f"({time.perf_counter() - start:.0f}s)")
        if args.which == "ubt":
            return 0
    return _ops_smoke(args)


def _ops_smoke(args: argparse.Namespace) -> int:
    from fastbd.environment import environment_report
    from fastbd.smoke import run_smoke

    if not args.quiet:
        print("\n".join(environment_report().lines()))
    result = run_smoke(args.device)
    path = result.save(args.out)
    print(f"\nops smoke run on {result.device}: each backend against the torch reference")
    print(f"{'op':<14} {'backend':<8} {'seconds':>9} {'max|err|':>10}  ok")
    for check in result.checks:
        print(f"{check.op:<14} {check.backend:<8} {check.seconds:>9.4f} "
              f"{check.max_abs_error:>10.2e}  {'yes' if check.ok else 'NO'}")
    print(f"\nwrote {path}")
    return 0 if result.ok else 1


def _prepare_out(out: str | Path) -> Path:
    """The command's output folder, checked before any work: created, writable, and emptied of
    the result an earlier run left there (so it never looks like this run's)."""
    from fastbd.storage import check_writable_dir, remove_result

    folder = check_writable_dir(out)
    remove_result(folder)
    return folder


def _duplicates(args: argparse.Namespace) -> str:
    """The readers' duplicate policy: ``refuse`` with ``--refuse-duplicates``, else ``warn``."""
    return "refuse" if getattr(args, "refuse_duplicates", False) else "warn"


def _world_config(args: argparse.Namespace, ssl: bool = False):
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


def _trigger_options(args: argparse.Namespace) -> dict:
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

    out = _prepare_out(args.out)
    clip_attack = args.attack != "htba"
    trigger_options = _trigger_options(args)
    if args.file_list or args.csv:
        if args.csv:
            pairs = read_csv_pairs(args.csv, image_key=args.image_key,
                                   caption_key=args.caption_key, separator=args.separator,
                                   duplicates=_duplicates(args))
            paths, captions = pairs.paths, pairs.captions
            labels = torch.tensor(csv_labels(args.csv, pairs))
        else:
            listing = read_file_list(args.file_list, duplicates=_duplicates(args))
            paths, captions, labels = listing.paths, None, torch.tensor(listing.labels)
        bank, report = ImageBank.from_files(paths, args.image_size, skip_bad=args.skip_bad,
                                            verbose=not args.quiet)
        labels = labels[report.kept]
        attack = make_attack(args.attack, args.image_size, seed=args.seed, **trigger_options)
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

        world = make_world(_world_config(args, ssl=not clip_attack))
        poisoned = (poison_world_pairs(world, args.attack, args.target, args.rate, args.seed)
                    if clip_attack else
                    poison_world_images(world, args.attack, args.target, args.fraction,
                                        args.seed, trigger_options))
    files = ResultFiles(out)
    written = export_images(out, poisoned.images, poisoned.labels, poisoned.poison_mask,
                            getattr(poisoned, "captions", None))
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


def cmd_train_ssl(args: argparse.Namespace) -> int:
    from fastbd.storage import ResultFiles
    from fastbd.training.ssl import SSLConfig
    from fastbd.world import SSLThreatConfig, build_ssl_threat

    config = SSLThreatConfig(world=_world_config(args, ssl=True), attack=args.attack,
                             target=args.target, fraction=args.fraction, width=args.width,
                             seed=args.seed, trigger_options=_trigger_options(args))
    epochs = config.ssl.epochs if args.epochs is None else args.epochs
    config.ssl = SSLConfig(**{**config.ssl.__dict__, "epochs": epochs, "seed": args.seed})
    out = _prepare_out(args.out)
    threat = build_ssl_threat(config, cache_dir=args.cache, device=args.device,
                              retrain=args.retrain, verbose=not args.quiet)
    files = ResultFiles(out)
    files.torch("encoder.pt", threat.encoder.state_dict())
    print(json.dumps(threat.probe.to_dict(), indent=2))
    print(files.json("train_ssl.json", threat.to_dict()))
    files.close()
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from fastbd.storage import ResultFiles
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat

    config = CLIPThreatConfig(world=_world_config(args), attack=args.attack, target=args.target,
                              rate=args.rate, seed=args.seed,
                              train=CLIPTrainConfig(seed=args.seed, **(
                                  {} if args.epochs is None else {"epochs": args.epochs})))
    out = _prepare_out(args.out)
    threat = build_clip_threat(config, cache_dir=args.cache, device=args.device,
                               retrain=args.retrain, verbose=not args.quiet)
    files = ResultFiles(out)
    files.torch("clip.pt", threat.model.state_dict())
    print(json.dumps(threat.evaluation.to_dict(), indent=2))
    print(files.json("train_clip.json", threat.to_dict()))
    files.close()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate saved weights on the synthetic world: an SSL encoder (linear probe) or a tiny
    CLIP (zero-shot CA / ASR)."""
    from fastbd.storage import ResultFiles
    from fastbd.world.synthetic import make_world

    out = _prepare_out(args.out)
    world = make_world(_world_config(args, ssl=args.kind == "ssl"))
    if args.kind == "ssl":
        from fastbd.attacks import make_attack
        from fastbd.eval.probe import linear_probe
        from fastbd.models import load_state, small_encoder

        encoder = small_encoder(args.width, args.image_size)
        load_state(encoder, args.checkpoint)
        # The clean model's ASR is measured with the trigger the poisoned one would carry.
        trigger = make_attack("htba" if args.attack == "none" else args.attack, args.image_size,
                              seed=args.seed, **_trigger_options(args))
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


def _refuse_unknown_keys(raw: object, cls, where: str) -> None:
    from dataclasses import fields

    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown config keys {sorted(unknown)}")


def _load_dataclass(path: str | None, cls, nested: dict | None = None, base=None):
    """An instance of the dataclass ``cls`` — ``base`` (default ``cls()``) with the fields a JSON
    or YAML file sets (``nested`` maps a field name to the dataclass its value updates)."""
    from dataclasses import replace

    from fastbd.data.readers import read_text_file

    base = cls() if base is None else base
    if path is None:
        return base
    text = read_text_file(path, "config")
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column "
                             f"{error.colno})") from None
    _refuse_unknown_keys(raw, cls, path)
    try:
        for name, inner in (nested or {}).items():
            if name in raw:
                _refuse_unknown_keys(raw[name], inner, f"{path}: {name}")
                raw[name] = replace(getattr(base, name), **raw[name])
        return replace(base, **raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _load_config(args: argparse.Namespace):
    """The detectors' ``poisoncam.Config``: ``--preset`` (default ``paper`` on a CUDA device,
    ``fast`` otherwise) with the fields of the ``--config`` file on top."""
    from fastbd.detection import ClassifierConfig, Config, preset

    name = args.preset or ("paper" if str(args.device).startswith("cuda") else "fast")
    if args.preset is None:
        log.info("preset %r for device %s (--preset paper|fast to choose)", name, args.device)
    return _load_dataclass(args.config, Config, {"classifier": ClassifierConfig},
                           base=preset(name))


def cmd_detect(args: argparse.Namespace) -> int:
    """PoisonCAM or PatchSearch over a file list or an ImageFolder."""
    import torch

    from fastbd import registry
    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import read_file_list, read_image_folder
    from fastbd.models import default_image_size, encoder_by_name

    if bool(args.file_list) == bool(args.image_folder):
        raise ValueError("give exactly one of --file-list and --image-folder")
    config = _load_config(args)
    out = _prepare_out(args.out)
    if args.file_list:
        listing = read_file_list(args.file_list, duplicates=_duplicates(args))
        paths, lines = listing.paths, listing.lines
    else:
        paths, labels, _ = read_image_folder(args.image_folder)
        lines = [f"{p} {label}" for p, label in zip(paths, labels, strict=True)]
    size = args.image_size or default_image_size(args.arch)
    encoder = encoder_by_name(args.arch, args.checkpoint, size)
    bank, report = ImageBank.from_files(paths, size, skip_bad=args.skip_bad,
                                        cache=out / "bank.npy", verbose=not args.quiet)
    lines = [lines[i] for i in report.kept]
    truth = torch.tensor(["HTBA_trigger" in str(paths[i]) for i in report.kept])
    detector = registry.detector(args.command, config)
    detector.fit(encoder, bank, device=args.device, checkpoint_dir=out, resume=args.resume,
                 ground_truth=truth if bool(truth.any()) else None, verbose=not args.quiet)
    result = detector.result_
    result.save(out, file_list_lines=lines, truth=truth if bool(truth.any()) else None)
    summary = {"removed": int(result.removed.sum()), "images": len(lines),
               "skipped": report.skipped, "out": str(out)}
    if result.metrics is not None:
        summary["metrics"] = result.metrics.to_dict()
    print(json.dumps(summary, indent=2))
    return 0


def _read_clip_pairs(args: argparse.Namespace, csv_path: str, model, out: Path, name: str):
    """uint8 images, token ids and ground truth (the CSV's ``is_backdoor`` column, or None) of
    the pairs in ``csv_path``, images through the eval transform at the model's input size."""
    import torch

    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import read_csv_pairs
    from fastbd.models.clip import clip_tokenizer, context_length_of, tokenize

    pairs = read_csv_pairs(csv_path, image_key=args.image_key, caption_key=args.caption_key,
                           separator=args.separator, duplicates=_duplicates(args))
    size = args.image_size or _clip_image_size(model)
    bank, report = ImageBank.from_files(pairs.paths, size, skip_bad=args.skip_bad,
                                        cache=out / f"{name}.npy", verbose=not args.quiet)
    captions = [pairs.captions[i] for i in report.kept]
    tokenizer = clip_tokenizer("ViT-B-32" if args.arch == "tiny" else args.arch)
    tokens = tokenize(tokenizer, captions, context_length_of(model))
    flags = pairs.columns.get("is_backdoor")
    truth = (torch.tensor([flags[i].strip().lower() in ("1", "true", "yes")
                           for i in report.kept]) if flags else None)
    return torch.as_tensor(bank.images[:]), tokens, truth, tokenizer, report


def _clip_image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def cmd_defend_clip(args: argparse.Namespace) -> int:
    """UBT, CleanCLIP or ABL on an open_clip model over a CSV of pairs."""
    from fastbd.models.clip import load_clip

    out = _prepare_out(args.out)
    model = load_clip(args.arch, args.checkpoint).to(args.device)
    if args.command == "cleanclip":
        from fastbd.baselines import CleanCLIPConfig, cleanclip
        from fastbd.data.augment import AugmentConfig

        config = _load_dataclass(args.config, CleanCLIPConfig, {"augment": AugmentConfig})
        images, tokens, truth, tokenizer, report = _read_clip_pairs(args, args.csv, model, out,
                                                                   "clean_pairs")
        result = cleanclip(model, images, tokens, config, device=args.device,
                           verbose=not args.quiet, checkpoint=out / "cleanclip.partial.pt")
    else:
        if args.reference_checkpoint is None:
            raise ValueError(f"{args.command} needs --reference-checkpoint (a clean model)")
        reference = load_clip(args.reference_arch or args.arch,
                              args.reference_checkpoint).to(args.device)
        if args.command == "ubt":
            from fastbd.ubt import Config, defend

            config = _load_dataclass(args.config, Config)
            images, tokens, truth, tokenizer, report = _read_clip_pairs(args, args.csv, model,
                                                                       out, "pairs")
            result = defend(model, images, tokens, reference=reference, config=config,
                            device=args.device, verbose=not args.quiet, checkpoint_dir=out)
        else:
            from fastbd.baselines import ABLConfig, abl

            config = _load_dataclass(args.config, ABLConfig)
            images, tokens, truth, tokenizer, report = _read_clip_pairs(args, args.csv, model,
                                                                       out, "pairs")
            result = abl(model, images, tokens, reference=reference, config=config,
                         device=args.device, verbose=not args.quiet, checkpoint_dir=out)
    result.save(out, truth=truth, tokens=tokens, tokenizer=tokenizer)
    summary = {**result.summary(truth), "pairs": int(tokens.shape[0]),
               "skipped": report.skipped, "out": str(out)}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=int, default=0, help="target class index")
    p.add_argument("--device", default=_default_device())
    from fastbd.world.synthetic import LAYOUTS

    p.add_argument("--layout", choices=LAYOUTS,
                   help="one object per image (single, the default) or the class's shape tiled "
                        "over the whole image")
    p.add_argument("--object-opacity", type=float,
                   help="objects' opacity, 0 (background only) to 1 (default: 0.6 in the SSL "
                        "world, 1 in the CLIP world)")
    p.add_argument("--background-saturation", type=float,
                   help="colour the background textures keep, 0 (grey) to 1 (default 0.5)")


def _add_duplicates_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refuse-duplicates", action="store_true",
                   help="stop when the file list names an image twice (or the CSV repeats an "
                        "image-caption pair); by default a warning says how many")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbd", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="versions, devices and available backends per op")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(run=cmd_env)

    demo = sub.add_parser("demo", help="the main job on the embedded synthetic world")
    demo.add_argument("which", nargs="?", default="all",
                      choices=["all", "poisoncam", "ubt", "ops"],
                      help="poisoncam: PoisonCAM vs PatchSearch on the poisoned SSL world; ubt: "
                      "UBT vs CleanCLIP and ABL on poisoned CLIPs; ops: the kernels against "
                      "their references; all: all three")
    demo.add_argument("--device", default=_default_device())
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--retrain", action="store_true",
                      help="retrain the SSL encoder on the cleaned set and report CA/ASR")
    demo.add_argument("--cache", default="fastbd-out/cache", help="threat-model cache")
    demo.add_argument("--out", default="fastbd-out/demo", help="report directory")
    demo.set_defaults(run=cmd_demo)

    from fastbd.attacks import ATTACKS

    attack = sub.add_parser("attack", help="poison the synthetic world, a file list or a CSV")
    _add_world_args(attack)
    attack.add_argument("--attack", choices=ATTACKS, default="htba")
    attack.add_argument("--fraction", type=float, default=0.5,
                        help="HTBA: fraction of the target class poisoned")
    attack.add_argument("--trigger-side", type=float,
                        help="HTBA trigger side as a fraction of the image side (default 50/224)")
    attack.add_argument("--rate", type=float,
                        help="CLIP attacks: poisoned share (default 0.01; the synthetic world "
                             "poisons 0.10 with WaNet)")
    attack.add_argument("--file-list", help="'<path> <label>' list to poison instead")
    attack.add_argument("--csv", help="CSV of image-caption pairs to poison instead")
    attack.add_argument("--image-key", default="image")
    attack.add_argument("--caption-key", default="caption")
    attack.add_argument("--separator", default=",")
    attack.add_argument("--class-names", help="comma-separated names for poisoned captions")
    attack.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    _add_duplicates_flag(attack)
    attack.add_argument("--out", default="fastbd-out/attack")
    attack.set_defaults(run=cmd_attack)

    ssl = sub.add_parser("train-ssl", help="train a SimCLR encoder on the (poisoned) world")
    _add_world_args(ssl)
    ssl.add_argument("--attack", choices=("htba", "none"), default="htba")
    ssl.add_argument("--fraction", type=float, default=0.5)
    ssl.add_argument("--trigger-side", type=float,
                     help="HTBA trigger side as a fraction of the image side (default 50/224)")
    ssl.add_argument("--width", type=int, default=16)
    ssl.add_argument("--epochs", type=int, default=None,
                     help="SimCLR epochs (default: SSLThreatConfig's)")
    ssl.add_argument("--cache", default="fastbd-out/cache")
    ssl.add_argument("--retrain", action="store_true", help="ignore cached weights")
    ssl.add_argument("--out", default="fastbd-out/train-ssl")
    ssl.set_defaults(run=cmd_train_ssl)

    clip = sub.add_parser("train-clip", help="train a tiny CLIP on (poisoned) world pairs")
    _add_world_args(clip)
    clip.add_argument("--attack", choices=ATTACKS[1:] + ("none",), default="badnet")
    clip.add_argument("--rate", type=float,
                      help="poisoned share (default 0.01, WaNet 0.10: the world's rates)")
    clip.add_argument("--epochs", type=int, help="default: CLIPTrainConfig's (8)")
    clip.add_argument("--cache", default="fastbd-out/cache")
    clip.add_argument("--retrain", action="store_true")
    clip.add_argument("--out", default="fastbd-out/train-clip")
    clip.set_defaults(run=cmd_train_clip)

    evaluate = sub.add_parser("eval", help="evaluate saved weights on the synthetic world")
    _add_world_args(evaluate)
    evaluate.add_argument("kind", choices=("ssl", "clip"))
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--attack", choices=ATTACKS + ("none",), default="htba")
    evaluate.add_argument("--width", type=int, default=16)
    evaluate.add_argument("--trigger-side", type=float,
                          help="HTBA trigger side as a fraction of the image side (default 50/224)")
    evaluate.add_argument("--out", default="fastbd-out/eval")
    evaluate.set_defaults(run=cmd_eval)

    helps = {"ubt": "purify a backdoored CLIP by token-level unlearning (UBT)",
             "cleanclip": "CleanCLIP fine-tuning on clean pairs (baseline)",
             "abl": "ABL gradient ascent on the suspicious pairs (baseline)"}
    for name, text in helps.items():
        defense = sub.add_parser(name, help=text)
        defense.add_argument("--csv", required=True,
                             help="pairs: the (possibly poisoned) training set; for cleanclip "
                                  "the clean fine-tuning set")
        defense.add_argument("--image-key", default="image")
        defense.add_argument("--caption-key", default="caption")
        defense.add_argument("--separator", default=",")
        defense.add_argument("--arch", default="tiny",
                             help="open_clip architecture (e.g. ViT-B-32, RN50) or 'tiny'")
        defense.add_argument("--checkpoint", required=True, help="the model to defend")
        if name != "cleanclip":
            defense.add_argument("--reference-checkpoint",
                                 help="a clean pre-trained model (required)")
            defense.add_argument("--reference-arch", help="its architecture (default --arch)")
        defense.add_argument("--image-size", type=int, default=None,
                             help="default: the model's input size")
        defense.add_argument("--config", help="JSON/YAML file with the defense's Config fields")
        defense.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
        _add_duplicates_flag(defense)
        defense.add_argument("--out", default=f"fastbd-out/{name}")
        defense.add_argument("--device", default=_default_device())
        defense.set_defaults(run=cmd_defend_clip)

    for name in ("poisoncam", "patchsearch"):
        det = sub.add_parser(name, help=f"find poisoned images with {name} (SSL encoders)")
        det.add_argument("--file-list", help="'<path> <label>' per line")
        det.add_argument("--image-folder", help="ImageFolder root")
        det.add_argument("--arch", required=True,
                         help="timm architecture (e.g. resnet18, vit_base_patch16_224), "
                              "torchvision:<name>, or smallconv<width> (fastbd train-ssl's "
                              "encoder, e.g. smallconv16)")
        det.add_argument("--checkpoint", help="state dict or MoCo v3 checkpoint")
        det.add_argument("--image-size", type=int,
                         help="encoder input side (default 32 for smallconv, else 224)")
        det.add_argument("--preset", choices=("paper", "fast"),
                         help="starting config: the papers' settings (5-ResNet classifier; "
                              "default on CUDA) or the CPU-sized demo recipe (default "
                              "otherwise)")
        det.add_argument("--config", help="JSON/YAML file with Config fields (on top of "
                                          "--preset)")
        det.add_argument("--out", default=f"fastbd-out/{name}")
        det.add_argument("--resume", action="store_true",
                         help="continue the search and the poison classifier's training "
                              "saved in --out")
        det.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
        _add_duplicates_flag(det)
        det.add_argument("--device", default=_default_device())
        det.set_defaults(run=cmd_detect)
    return parser


CONTINUED_BY_RERUN = ("demo", "train-ssl", "train-clip", "cleanclip", "ubt", "abl")
"""Commands whose training checkpoints each epoch and continues when run again."""

DEBUG_VARIABLE = "FASTBD_DEBUG"
"""Set (to anything) in the environment, the command shows the traceback of a failure instead of
its one-line message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, ``kill`` and job schedulers send), raised in the main thread
    like Ctrl-C so that every ``finally`` and checkpoint runs the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def _error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) \
            and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error).replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command: 0 on success, 1 on failed checks, 2 when the input was unusable (a
    missing, unreadable or malformed file, a bad value, an output folder that cannot be
    written: one line on stderr naming it), 130 when interrupted by Ctrl-C (SIGINT) and 143 by
    SIGTERM — both after saving what a rerun continues from, with a line saying how."""
    import os
    import signal

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except (OSError, ValueError) as error:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"fastbd {args.command}: error: {_error_line(error)} (set {DEBUG_VARIABLE}=1 for "
              "the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if getattr(args, "resume", None) is not None:
            hint = (f"; rerun with --resume to continue from the last completed search round "
                    f"and the poison classifier's last saved state in {args.out}")
        elif args.command in CONTINUED_BY_RERUN:
            hint = "; rerun the same command to continue training from its last completed epoch"
        else:
            hint = ""
        terminated = isinstance(interrupt, Terminated)
        print(f"fastbd {args.command}: {'terminated' if terminated else 'interrupted'}{hint}",
              file=sys.stderr)
        return 128 + interrupt.signum if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

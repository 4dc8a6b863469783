"""``fastbd train-ssl``, ``train-clip`` and ``eval``: train and evaluate threat models on the
synthetic world or on the user's own files (a file list or ImageFolder for SSL encoders, a CSV
of pairs for CLIP models) — the steps around a detector or a defense in the papers' loops."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fastbd.cli.common import (
    add_command,
    add_duplicates_flag,
    add_image_source_flags,
    add_pair_csv_flags,
    add_shards_flags,
    class_names_arg,
    duplicates_policy,
    load_clip_pairs,
    positive_int,
    prepare_out,
    read_labelled_images,
    remove_pairs_cache,
    templates_arg,
)
from fastbd.cli.world import add_world_args, trigger_options, world_config

log = logging.getLogger("fastbd")


def save_threat(out: Path, weights: str, state: dict, evaluation: dict | None, summary: str,
                record: dict, quiet: bool = False) -> int:
    """Write trained weights and the run's summary as one result (rank 0 under torchrun);
    print the evaluation and where the summary went (``quiet``: nothing)."""
    from fastbd.distributed import world
    from fastbd.storage import ResultFiles

    if not world().main:
        return 0
    files = ResultFiles(out)
    files.torch(weights, state)
    if evaluation is not None and not quiet:
        print(json.dumps(evaluation, indent=2))
    path = files.json(summary, record)
    if not quiet:
        print(path)
    files.close()
    return 0


def training_config(args: argparse.Namespace, base, nested: dict[str, type] | None = None):
    """``base`` (an ``SSLConfig`` or ``CLIPTrainConfig``) with the ``--config`` file's fields
    on top (``nested``: its fields holding config classes), then the flags' method (SSL only),
    epochs, batch size, lr and seed."""
    from dataclasses import replace

    from fastbd.configfile import load_config

    base = load_config(args.config, type(base), nested, base=base)
    chosen = {name: getattr(args, name, None) for name in ("method", "epochs", "batch_size", "lr",
                                                           "icutmix", "icutmix_alpha")}
    config = replace(base, seed=args.seed, **{k: v for k, v in chosen.items() if v is not None})
    if config.epochs == 0:
        raise ValueError("epochs is 0: that would save an untrained model; give --epochs ≥ 1")
    return config


def one_process_world(command: str, data_flags: str) -> None:
    """Refuse the synthetic world's threat training under a larger torchrun world (it builds
    and caches a world, an attack and a probe in one process)."""
    from fastbd.distributed import world

    if world().size > 1:
        raise ValueError(f"{command} on the synthetic world runs in one process; under "
                         f"torchrun train on {data_flags}")


def cmd_train_ssl(args: argparse.Namespace) -> int:
    if args.file_list or args.image_folder:
        return train_ssl_on_files(args)
    one_process_world("train-ssl", "--file-list or --image-folder")
    from fastbd.data.augment import AugmentConfig
    from fastbd.world import SSLThreatConfig, build_ssl_threat

    if args.arch is not None:
        raise ValueError("--arch needs --file-list or --image-folder (the synthetic world "
                         "trains smallconv<--width>)")
    if args.eval_every is not None:
        raise ValueError("--eval-every needs --file-list or --image-folder with --probe-list "
                         "and --val-list (the synthetic world's threat model is probed once)")
    if args.training_attack != "none" or args.bad_reference:
        raise ValueError("--training-attack and --bad-reference need --file-list or "
                         "--image-folder (the synthetic world's implanted threat is "
                         "implanted_ssl_threat's)")
    config = SSLThreatConfig(world=world_config(args, ssl=True), attack=args.attack,
                             target=args.target, fraction=args.fraction, width=args.width,
                             seed=args.seed, trigger_options=trigger_options(args))
    config.ssl = training_config(args, config.ssl, {"augment": AugmentConfig})
    out = prepare_out(args.out)
    threat = build_ssl_threat(config, cache_dir=args.cache, device=args.device,
                              retrain=args.retrain, verbose=not args.quiet)
    record = {**threat.to_dict(), "arch": threat.encoder.name,
              "image_size": threat.encoder.image_size}
    return save_threat(out, "encoder.pt", threat.encoder.backbone.state_dict(),
                       threat.probe.to_dict(), "train_ssl.json", record, args.quiet)


def train_ssl_on_files(args: argparse.Namespace) -> int:
    """Train ``--arch`` from scratch on the images of a file list or an ImageFolder (labels
    unused); the weights are the backbone's own state dict, what ``--checkpoint`` reads."""
    from fastbd.data.augment import AugmentConfig
    from fastbd.data.bank import ImageBank, remove_cache
    from fastbd.models import encoder_by_name
    from fastbd.training.ssl import SSLConfig, train_ssl

    arch = args.arch or f"smallconv{args.width}"
    if args.eval_every is not None and not (args.probe_list and args.val_list):
        raise ValueError("--eval-every needs --probe-list and --val-list (the clean labelled "
                         "images the probe learns from and is scored on)")
    paths, _, _ = read_labelled_images(args.file_list, args.image_folder,
                                       duplicates_policy(args))
    out = prepare_out(args.out)
    encoder = encoder_by_name(arch, image_size=args.image_size, seed=args.seed)
    implant_targets = training_attack_targets(args, encoder)  # read (or refused) before training
    evaluation = epoch_evaluation(args, encoder)  # its lists read (or refused) before training
    cache = out / "bank.npy"
    bank, report = ImageBank.from_files(paths, encoder.image_size, crop_ratio=encoder.crop_ratio,
                                        skip_bad=args.skip_bad, cache=cache,
                                        verbose=not args.quiet)
    config = training_config(args, SSLConfig(), {"augment": AugmentConfig})
    trained = TrainedBeforeAttack(out / "trained_before_attack.pt", arch, config, bank.images)
    history = trained.restore(encoder) if implant_targets else None
    if history is None:
        history = train_ssl(encoder, bank.images, config, device=args.device,
                            verbose=not args.quiet, checkpoint=out / "train_state.pt",
                            **evaluation)
    implanted = None
    if implant_targets:
        trained.save(encoder, history)  # an interrupted attack does not retrain
        implanted = badencoder_on_files(args, encoder, bank.images, implant_targets)
    del bank  # the memory map, before its file goes
    if not args.keep_cache:
        remove_cache(cache)
    record = {"arch": arch, "image_size": encoder.image_size, "images": len(report.kept),
              "skipped": report.skipped, "seconds": history.seconds,
              "images_per_second": history.images_per_second,
              "final_loss": history.losses[-1] if history.losses else None,
              "config": history.config,
              **({"per_epoch": history.evaluations} if history.evaluations else {}),
              "training_attack": implanted or {"method": "none"}}
    code = save_threat(out, "encoder.pt", encoder.backbone.state_dict(), None,
                       "train_ssl.json", record, args.quiet)
    trained.remove()
    return code


class TrainedBeforeAttack:
    """The trained encoder kept while the training-time attack runs (``path``), so that a rerun
    after an interrupted attack continues from the trained weights instead of training again;
    it belongs to the run of ``arch``, ``config`` and ``images`` (a file of another run is
    ignored) and is removed once the result is saved."""

    def __init__(self, path, arch: str, config, images) -> None:
        from dataclasses import asdict

        from fastbd.storage import fingerprint

        self.path = path
        self.run = {"arch": arch, "config": asdict(config), "data": fingerprint(images)}

    def restore(self, encoder):
        """The saved ``SSLHistory`` with ``encoder``'s weights loaded, or None."""
        from fastbd.storage import load_torch
        from fastbd.training.ssl import SSLHistory

        if not self.path.is_file():
            return None
        saved = load_torch(self.path, "trained encoder")
        if not isinstance(saved, dict) or saved.get("run") != self.run:
            return None
        encoder.backbone.load_state_dict(saved["backbone"])
        return SSLHistory(**saved["history"])

    def save(self, encoder, history) -> None:
        """Keep the weights and history (rank 0 of a ``torch.distributed`` world writes)."""
        from dataclasses import asdict

        from fastbd.distributed import world
        from fastbd.storage import save_atomically

        if world().main:
            save_atomically({"run": self.run, "backbone": encoder.backbone.state_dict(),
                             "history": asdict(history)}, self.path)

    def remove(self) -> None:
        from fastbd.distributed import world

        if world().main:
            self.path.unlink(missing_ok=True)


def training_attack_targets(args: argparse.Namespace, encoder) -> list[tuple[int, object, object]]:
    """``--training-attack badencoder``: each target of ``--attack-spec`` with its trigger and
    its ``--bad-reference`` images (uint8 ``R×3×S×S`` at the encoder's size); [] without it.
    Everything is read, or refused, before any training."""
    if args.training_attack == "none":
        if args.bad_reference:
            raise ValueError("--bad-reference is the training attack's: add --training-attack "
                             "badencoder")
        return []
    if args.attack_spec is None or not args.bad_reference:
        raise ValueError("--training-attack badencoder needs --attack-spec (the attack.json "
                         "whose trigger it implants) and --bad-reference (images of the target "
                         "class the attacker holds; TARGET:PATH for a multi-target attack)")
    from fastbd.cli.common import grouped_references
    from fastbd.configfile import read_config_file
    from fastbd.data.bank import ImageBank

    recorded = read_config_file(args.attack_spec)
    targets = recorded.get("targets") or [recorded.get("target", args.target)]
    out = []
    for target, paths in zip(targets, grouped_references(args.bad_reference, targets,
                                                         "--bad-reference"), strict=True):
        trigger = eval_trigger(argparse.Namespace(
            attack_spec=args.attack_spec, trigger=None, target=target), encoder.image_size,
            "htba")
        references = ImageBank.from_files(paths, encoder.image_size,
                                          crop_ratio=encoder.crop_ratio,
                                          verbose=not args.quiet)[0].images
        out.append((int(target), trigger, references))
    return out


def badencoder_on_files(args: argparse.Namespace, encoder, shadow, targets) -> dict:
    """The training-time attack on the trained ``encoder``: BadEncoder fine-tuning with the
    training images as shadow images and each target's trigger and references; what
    ``train_ssl.json`` records under ``training_attack``."""
    import time

    from fastbd.attacks.badencoder import BadEncoderConfig, badencoder_finetune_targets

    config = BadEncoderConfig(seed=args.seed, **(
        {} if args.badencoder_steps is None else {"steps": args.badencoder_steps}))
    start = time.perf_counter()
    losses = badencoder_finetune_targets(encoder, shadow,
                                         [(trigger, refs) for _, trigger, refs in targets],
                                         config, device=args.device, verbose=not args.quiet)
    encoder.eval()
    return {"method": "badencoder", "label": "training-time attack: the attacker fine-tuned "
            "the trained encoder (BadEncoder)", "targets": [t for t, _, _ in targets],
            "references": {str(t): int(refs.shape[0]) for t, _, refs in targets},
            "steps": config.steps, "final_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start}


def epoch_evaluation(args: argparse.Namespace, encoder) -> dict:
    """``--eval-every N``: ``train_ssl``'s ``evaluate`` — the linear probe on ``--probe-list``
    (the papers' 1 %, stratified) scored on ``--val-list``, clean and patched with the
    ``--attack-spec`` trigger (default HTBA's): the PoisonCAM paper's Table III columns, clean
    accuracy and patched-data false positives per epoch. Nothing without the flag."""
    if args.eval_every is None:
        return {}
    from fastbd.eval.probe import PAPER_LABELLED_FRACTION, ProbeConfig, linear_probe

    _check_val_classes(args.probe_list, args.val_list, duplicates_policy(args))
    probe_images, probe_labels = _labelled_bank(args.probe_list, encoder, args)
    val_images, val_labels = _labelled_bank(args.val_list, encoder, args)
    trigger = eval_trigger(argparse.Namespace(
        attack_spec=args.attack_spec, trigger=None, trigger_side=args.trigger_side,
        attack="htba", seed=args.seed, target=args.target), encoder.image_size, "htba")
    probe = ProbeConfig(labelled_fraction=PAPER_LABELLED_FRACTION)

    def evaluate(trained) -> dict:
        result = linear_probe(trained, probe_images, probe_labels, val_images, val_labels,
                              trigger, args.target, probe, device=args.device)
        return {"clean_accuracy": result.clean_accuracy,
                "patched_accuracy": result.patched_accuracy,
                "patched_false_positives": result.target_false_positives, "asr": result.asr}

    return {"evaluate": evaluate, "evaluate_every": args.eval_every}


def training_objective(args: argparse.Namespace):
    """``--defense``'s training objective (None: plain InfoNCE); its flags without it are an
    error."""
    from fastbd import registry

    chosen = {name: getattr(args, name) for name in ("pool_size", "refresh_every")
              if getattr(args, name) is not None}
    if args.defense != "roclip" and chosen:
        raise ValueError("--pool-size and --refresh-every are RoCLIP's: add --defense roclip")
    if args.defense == "none":
        return None
    entry = registry.training_defense(args.defense)
    return entry.objective(entry.config(seed=args.seed, **chosen))


def cmd_train_clip(args: argparse.Namespace) -> int:
    objective = training_objective(args)
    if args.csv or args.shards:
        return train_clip_on_csv(args, objective)
    one_process_world("train-clip", "--csv or --shards")
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat

    if args.arch != "tiny" or args.image_size not in (None, 32):
        raise ValueError("--arch and --image-size need --csv or --shards (the synthetic world "
                         "trains the 32-px tiny CLIP)")
    if args.init_checkpoint or args.pretrained:
        raise ValueError("--init-checkpoint and --pretrained need --csv or --shards (the "
                         "synthetic world trains its tiny CLIP from scratch)")
    config = CLIPThreatConfig(world=world_config(args), attack=args.attack, target=args.target,
                              rate=args.rate, seed=args.seed,
                              train=training_config(args, CLIPTrainConfig()))
    out = prepare_out(args.out)
    threat = build_clip_threat(config, cache_dir=args.cache, device=args.device,
                               retrain=args.retrain, verbose=not args.quiet, objective=objective)
    return save_threat(out, "clip.pt", threat.model.state_dict(), threat.evaluation.to_dict(),
                       "train_clip.json", {**threat.to_dict(), "arch": "tiny",
                                           "defense": _defense_record(objective)}, args.quiet)


def _defense_record(objective) -> dict:
    return {"method": "none"} if objective is None else objective.config()


def train_clip_on_csv(args: argparse.Namespace, objective) -> int:
    """Train ``--arch`` on the pairs of a CSV or of WebDataset shards: from scratch, or
    fine-tuned from ``--init-checkpoint`` / open_clip's ``--pretrained`` weights (the UBT
    paper's threat model: a pre-trained CLIP fine-tuned on poisoned pairs)."""
    from fastbd.models.clip import clip_image_size, load_clip
    from fastbd.training.clip import CLIPTrainConfig, train_clip

    out = prepare_out(args.out)
    model = load_clip(args.arch, args.init_checkpoint, image_size=args.image_size,
                      seed=args.seed, pretrained=args.pretrained)
    cache = out / "pairs.npy"
    pairs = load_clip_pairs(args, args.csv, model, cache)
    config = training_config(args, CLIPTrainConfig())
    history = train_clip(model, pairs.images, pairs.tokens, config, device=args.device,
                         verbose=not args.quiet, checkpoint=out / "train_state.pt",
                         objective=objective)
    del pairs
    if not args.keep_cache:
        remove_pairs_cache(cache)
    record = {"arch": args.arch, "image_size": clip_image_size(model),
              "initialised_from": (str(args.init_checkpoint) if args.init_checkpoint
                                   else f"open_clip:{args.pretrained}" if args.pretrained
                                   else "random"),
              "seconds": history.seconds, "pairs_per_second": history.pairs_per_second,
              "final_loss": history.losses[-1] if history.losses else None,
              "config": history.config, "defense": _defense_record(objective)}
    return save_threat(out, "clip.pt", model.state_dict(), None, "train_clip.json", record,
                       args.quiet)


def eval_trigger(args: argparse.Namespace, image_size: int, default: str):
    """The trigger whose ASR is measured: ``--trigger`` (a PNG pasted as a patch of
    ``--trigger-side``), ``--attack-spec`` (the trigger an ``attack.json`` of ``fastbd attack``
    records: attack, seed and options), else ``--attack`` (``none``: ``default``'s, so a clean
    model is measured with the trigger a poisoned one would carry)."""
    from fastbd.attacks import make_attack

    if args.attack_spec is not None and args.trigger is not None:
        raise ValueError("give one of --trigger and --attack-spec")
    if args.attack_spec is not None:
        from fastbd.configfile import read_config_file

        recorded = read_config_file(args.attack_spec)
        spec = recorded.get("trigger")
        if isinstance(recorded.get("triggers"), list):  # a multi-target attack: --target's
            matching = [t for t in recorded["triggers"] if t.get("target") == args.target]
            if not matching:
                raise ValueError(f"{args.attack_spec}: no trigger for target {args.target} "
                                 f"(its targets: {recorded.get('targets')}); give --target")
            spec = matching[0]
        if not isinstance(spec, dict) or not isinstance(spec.get("attack"), str):
            raise ValueError(f"{args.attack_spec}: no 'trigger' with an 'attack' name (the "
                             "attack.json fastbd attack writes)")
        options = dict(spec.get("options") or {})
        if "trigger_file" in options:  # fastbd attack --trigger: the file's pixels
            from fastbd.data.bank import load_trigger

            options["pattern"] = load_trigger(options.pop("trigger_file"))
        return make_attack(spec["attack"], image_size, seed=int(spec.get("seed", 0)),
                           **options)
    if args.trigger is not None:
        from fastbd.attacks.triggers import PatchAttack
        from fastbd.data.bank import load_image

        side = 50 / 224 if args.trigger_side is None else args.trigger_side
        pattern = load_image(args.trigger, max(8, round(side * image_size)), crop_ratio=1.0)
        return PatchAttack(name=f"patch:{Path(args.trigger).name}", image_size=image_size,
                           pattern=pattern, side_fraction=side, eval_region=(0.10, 0.90))
    name = default if args.attack in (None, "none") else args.attack
    if name in ("trojvqa", "ssba"):
        raise ValueError(f"{name}'s trigger is what fastbd attack made (an optimised patch, a "
                         "trained encoder): give --attack-spec ATTACK_DIR/attack.json")
    options = trigger_options(args) if name == "htba" else {}
    return make_attack(name, image_size, seed=args.seed, **options)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate saved weights: an SSL encoder (linear probe) or a CLIP (zero-shot), on the
    synthetic world or on the user's files."""
    from fastbd.storage import ResultFiles

    out = prepare_out(args.out)
    if args.kind == "ssl":
        if args.triggered_csv:
            raise ValueError("--triggered-csv is for eval clip (eval ssl triggers the "
                             "validation images with --attack, --trigger or --attack-spec)")
        if args.retrained_checkpoint:
            raise ValueError("--retrained-checkpoint is for eval clip (the KL of zero-shot "
                             "answers)")
        result = eval_ssl(args)
    else:
        result = eval_clip(args)
    files = ResultFiles(out)
    path = files.json("eval.json", result)
    files.close()
    if args.quiet:  # one decision line
        print(f"eval {args.kind}: clean accuracy {result['clean_accuracy']:.1%}, ASR "
              f"{result['asr']:.1%}")
    else:
        print(json.dumps(result, indent=2))
        print(path)
    return 0


def eval_ssl(args: argparse.Namespace) -> dict:
    from fastbd.eval.probe import PAPER_LABELLED_FRACTION, ProbeConfig, linear_probe
    from fastbd.models import encoder_by_name

    if bool(args.train_list) != bool(args.val_list):
        raise ValueError("give both --train-list and --val-list (or neither: the synthetic "
                         "world)")
    arch = args.arch or f"smallconv{args.width}"
    encoder = encoder_by_name(arch, args.checkpoint, args.image_size)
    if args.train_list:
        _check_val_classes(args.train_list, args.val_list, duplicates_policy(args))
        train_images, train_labels = _labelled_bank(args.train_list, encoder, args)
        val_images, val_labels = _labelled_bank(args.val_list, encoder, args)
    else:
        from fastbd.world.synthetic import make_world

        world = make_world(world_config(args, ssl=True))
        train_images, train_labels = world.train.images, world.train.labels
        val_images, val_labels = world.eval.images, world.eval.labels
    trigger = eval_trigger(args, encoder.image_size, "htba")
    share = args.labelled_fraction
    if share is None:
        share = PAPER_LABELLED_FRACTION if args.train_list else ProbeConfig().labelled_fraction
    result = linear_probe(encoder, train_images, train_labels, val_images, val_labels, trigger,
                          args.target, ProbeConfig(labelled_fraction=share),
                          device=args.device).to_dict()
    result["labelled_fraction"] = share
    return {**result, "attack": trigger.name, "arch": arch,
            "checkpoint": str(args.checkpoint)}


def _check_val_classes(train_list: str, val_list: str, duplicates: str) -> None:
    """Refuse a validation label the probe's training list never has (``ValueError`` naming
    the validation list's line): the probe would grow a class it cannot learn and score every
    such image wrong without a word."""
    from fastbd.data.readers import read_file_list
    from fastbd.storage import read_text_file

    classes = set(read_file_list(train_list, duplicates="allow").labels)
    listing = read_file_list(val_list, duplicates=duplicates)
    for label, line in zip(listing.labels, listing.lines, strict=True):
        if label not in classes:
            raw = read_text_file(Path(val_list), "file list").splitlines()
            number = next(i for i, text in enumerate(raw, start=1)
                          if text.strip() == line.strip())
            raise ValueError(f"{val_list}:{number}: label {label} is not a class of the probe's "
                             f"training list {train_list} (its labels: {min(classes)}–"
                             f"{max(classes)})")


def _labelled_bank(file_list: str, encoder, args: argparse.Namespace):
    import torch

    from fastbd.data.bank import ImageBank
    from fastbd.data.readers import read_file_list

    listing = read_file_list(file_list, duplicates=duplicates_policy(args))
    bank, report = ImageBank.from_files(listing.paths, encoder.image_size,
                                        crop_ratio=encoder.crop_ratio, skip_bad=args.skip_bad,
                                        verbose=not args.quiet)
    return bank.images, torch.tensor(listing.labels)[report.kept]


def eval_clip(args: argparse.Namespace) -> dict:
    from fastbd.models.clip import clip_tokenizer, load_clip, tokenizer_name

    args.arch = args.arch or "tiny"
    model = load_clip(args.arch, args.checkpoint, image_size=args.image_size)
    model = model.to(args.device)
    tokenizer = clip_tokenizer(tokenizer_name(args.arch))
    if args.eval_csv is None and args.shards is None:
        if args.class_names or args.templates:
            raise ValueError("--class-names and --templates need --eval-csv or --shards")
        from fastbd.world import evaluate_clip
        from fastbd.world.synthetic import make_world

        if args.triggered_csv:
            raise ValueError("--triggered-csv needs --eval-csv or --shards (its clean "
                             "counterpart) and --class-names")
        from fastbd.world import ZERO_SHOT_TEMPLATES

        world = make_world(world_config(args))
        attack = "badnet" if args.attack in (None, "none") else args.attack
        result = evaluate_clip(model, tokenizer, world, attack, args.target, args.seed,
                               args.device).to_dict()
        return {**result, **_kl_to_retrained(args, model, tokenizer, world.eval.images,
                                             world.class_names, ZERO_SHOT_TEMPLATES)}
    from fastbd.eval.zeroshot import GENERIC_TEMPLATES, evaluate_zero_shot
    from fastbd.models.clip import clip_image_size

    if not args.class_names:
        raise ValueError("--eval-csv/--shards needs --class-names (comma-separated, or a file "
                         "with one name per line, in label order)")
    names = class_names_arg(args.class_names)
    templates = templates_arg(args.templates) if args.templates else list(GENERIC_TEMPLATES)
    pairs = load_clip_pairs(args, args.eval_csv, model, None, captions_required=False)
    if pairs.labels is None:
        raise ValueError(f"{args.eval_csv or args.shards}: no labels (a 'label' column, or a "
                         "'label' in every shard sample's json: the class index of each image, "
                         "in --class-names order)")
    if pairs.tokens is None:
        log.info("%s has no %r column: zero-shot only, retrieval not measured", args.eval_csv,
                 args.caption_key)
    trigger = (_triggered_set(args, model) if args.triggered_csv
               else eval_trigger(args, clip_image_size(model), "badnet"))
    result = evaluate_zero_shot(model, tokenizer, pairs.images, pairs.labels, names, templates,
                                trigger, args.target, tokens=pairs.tokens, seed=args.seed,
                                device=args.device)
    return {**result.to_dict(), "arch": args.arch, "checkpoint": str(args.checkpoint),
            "images": int(pairs.labels.numel()),
            **_kl_to_retrained(args, model, tokenizer, pairs.images, names, templates)}


def _kl_to_retrained(args: argparse.Namespace, model, tokenizer, images, class_names,
                     templates) -> dict:
    """``--retrained-checkpoint``: the KL of the evaluated model's zero-shot answers from a
    model retrained on clean data (``zero_shot_kl``), with that checkpoint; else nothing."""
    if args.retrained_checkpoint is None:
        return {}
    from fastbd.eval.zeroshot import zero_shot_kl
    from fastbd.models.clip import load_clip

    retrained = load_clip(args.arch, args.retrained_checkpoint,
                          image_size=args.image_size).to(args.device)
    return {"kl_to_retrained": zero_shot_kl(model, retrained, tokenizer, images, class_names,
                                            templates, device=args.device),
            "retrained_checkpoint": str(args.retrained_checkpoint)}


def _triggered_set(args: argparse.Namespace, model):
    """``--triggered-csv``: images that already carry the trigger, with their true labels."""
    from fastbd.clipdefense.loading import load_pairs
    from fastbd.eval.zeroshot import TriggeredSet
    from fastbd.models.clip import tokenizer_name

    given = [flag for flag, value in (("--attack", args.attack), ("--trigger", args.trigger),
                                      ("--attack-spec", args.attack_spec)) if value is not None]
    if given:
        raise ValueError(f"--triggered-csv holds images already triggered; {given[0]} would "
                         "trigger them again (give one or the other)")
    pairs = load_pairs(args.triggered_csv, model, tokenizer_name=tokenizer_name(args.arch),
                       image_key=args.image_key, caption_key=args.caption_key,
                       separator=args.separator, image_size=args.image_size,
                       skip_bad=args.skip_bad, duplicates=duplicates_policy(args),
                       verbose=not args.quiet, captions_required=False)
    if pairs.labels is None:
        raise ValueError(f"{args.triggered_csv}: no 'label' column (each triggered image's "
                         "true class, in --class-names order: ASR counts those outside the "
                         "target class)")
    return TriggeredSet(pairs.images, pairs.labels,
                        f"triggered-csv:{Path(args.triggered_csv).name}")


def add_training_flags(p: argparse.ArgumentParser, epochs_default: str, config: str) -> None:
    """What both trainers take: the training config and its main fields, the image cache,
    the synthetic world's threat-model cache, bad-input policies."""
    p.add_argument("--config", help=f"JSON/YAML file with {config} fields (the flags below "
                   "override it)")
    p.add_argument("--epochs", type=int, help=f"training epochs (default: {epochs_default})")
    p.add_argument("--batch-size", type=positive_int, help="training batch size (default: the "
                   "training config's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the training "
                   "config's)")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep the memory-mapped copy of the images in --out after a successful "
                        "run (by default it is removed; an interrupted run keeps it to resume)")
    p.add_argument("--cache", default="fastbd-out/cache",
                   help="synthetic world: threat-model cache (reused when the settings match)")
    p.add_argument("--retrain", action="store_true", help="synthetic world: ignore cached "
                   "weights")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    add_duplicates_flag(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd import registry
    from fastbd.attacks import ATTACKS, CLIP_ATTACKS
    from fastbd.training.ssl import SSL_METHODS

    ssl = add_command(sub, "train-ssl", "train an SSL encoder on the (poisoned) synthetic "
                      "world or on your images", [
                          "fastbd train-ssl --attack htba --out fastbd-out/ssl",
                          "fastbd train-ssl --file-list fastbd-out/htba/train.txt "
                          "--arch smallconv16 --method byol --epochs 40 --out fastbd-out/ssl",
                          "fastbd train-ssl --image-folder data/train --arch resnet18 "
                          "--image-size 96 --method mocov3 --device cuda --out fastbd-out/r18"])
    add_world_args(ssl)
    add_image_source_flags(ssl, "the images to train on instead of the synthetic world "
                                "(labels unused)")
    ssl.add_argument("--arch", help="with --file-list/--image-folder: timm architecture, "
                     "torchvision:<name> or smallconv<width> (default smallconv<--width>)")
    ssl.add_argument("--method", choices=SSL_METHODS,
                     help="self-supervised method (default: SimCLR; the world's threat "
                          "config's)")
    ssl.add_argument("--eval-every", type=positive_int,
                     help="with --file-list/--image-folder: every N epochs (and after the "
                          "last) the linear probe's clean accuracy, patched accuracy, "
                          "patched-data false positives and ASR, into train_ssl.json "
                          "'per_epoch' (the PoisonCAM paper's Table III); needs --probe-list "
                          "and --val-list")
    ssl.add_argument("--probe-list", help="with --eval-every: clean labelled images the probe "
                     "learns from (1 %%, stratified)")
    ssl.add_argument("--val-list", help="with --eval-every: clean labelled images it is "
                     "scored on")
    ssl.add_argument("--attack-spec", help="with --eval-every: the attack.json whose trigger "
                     "patches the validation images (default: HTBA's pattern); with "
                     "--training-attack: the trigger(s) and target(s) it implants")
    ssl.add_argument("--training-attack", choices=("none", "badencoder"), default="none",
                     help="with --file-list/--image-folder: attack the training itself — "
                     "badencoder fine-tunes the trained encoder so that --attack-spec's "
                     "triggered images map to the --bad-reference images' features (the "
                     "implanted threat of the PoisonCAM tables; labelled as a training-time "
                     "attack in train_ssl.json)")
    ssl.add_argument("--bad-reference", action="append",
                     help="--training-attack badencoder: an image of the target class the "
                     "attacker holds (repeat; TARGET:PATH for each target of a multi-target "
                     "attack)")
    ssl.add_argument("--badencoder-steps", type=positive_int,
                     help="--training-attack badencoder: fine-tuning steps (default 300)")
    ssl.add_argument("--icutmix", action="store_true", default=None,
                     help="i-CutMix (MoCo v3): PatchSearch's training recipe after a defense, "
                          "a defense of its own in the PoisonCAM paper's Fig. 10")
    ssl.add_argument("--icutmix-alpha", type=float,
                     help="i-CutMix's Beta(alpha, alpha) for the kept area (default 1.0)")
    ssl.add_argument("--attack", choices=("htba", "none"), default="htba",
                     help="synthetic world: the poisoning of the training set")
    ssl.add_argument("--fraction", type=float, default=0.5,
                     help="synthetic world, HTBA: fraction of the target class poisoned")
    ssl.add_argument("--trigger-side", type=float,
                     help="HTBA trigger side as a fraction of the image side (default 50/224)")
    ssl.add_argument("--width", type=int, default=16, help="the small conv encoder's width")
    add_training_flags(ssl, "SSLConfig's", "SSLConfig (augment: AugmentConfig)")
    ssl.add_argument("--out", default="fastbd-out/train-ssl", help="output folder")
    ssl.set_defaults(run=cmd_train_ssl, continued_by_rerun=True, distributed=True)

    clip = add_command(sub, "train-clip", "train a CLIP on (poisoned) synthetic-world pairs or "
                       "on your CSV", [
                           "fastbd train-clip --attack badnet --out fastbd-out/clip",
                           "fastbd train-clip --csv fastbd-out/badnet/train.csv --arch tiny "
                           "--image-size 64 --epochs 12 --out fastbd-out/clip",
                           "fastbd train-clip --csv pairs.csv --image-key filepath "
                           "--caption-key title --arch RN50 --device cuda --out fastbd-out/rn50",
                           "fastbd train-clip --shards 'cc3m/{00000..00331}.tar' --arch "
                           "ViT-B-32 --device cuda --out fastbd-out/vitb32",
                           "fastbd train-clip --attack blended --defense roclip "
                           "--out fastbd-out/roclip"])
    add_world_args(clip)
    add_pair_csv_flags(clip, "--csv", False, "the pairs to train on instead of the synthetic "
                       "world")
    add_shards_flags(clip, "the pairs to train on")
    clip.add_argument("--arch", default="tiny",
                      help="with --csv: open_clip architecture (e.g. RN50, ViT-B-32) or 'tiny'")
    start = clip.add_mutually_exclusive_group()
    start.add_argument("--init-checkpoint", help="with --csv/--shards: fine-tune these weights "
                       "(a state dict of --arch) instead of training from scratch — the UBT "
                       "paper's threat model is a pre-trained CLIP fine-tuned on poisoned pairs "
                       "(lr 1e-6, 3 epochs)")
    start.add_argument("--pretrained", help="with --csv/--shards: fine-tune open_clip's "
                       "pre-trained weights of --arch by tag (e.g. openai; from open_clip's "
                       "cache, downloaded where the network allows)")
    clip.add_argument("--attack", choices=CLIP_ATTACKS + ("none",), default="badnet",
                      help="synthetic world: the poisoning of the training pairs")
    clip.add_argument("--rate", type=float,
                      help="synthetic world: poisoned share (default 0.01, WaNet 0.10)")
    clip.add_argument("--defense", choices=("none", *registry.TRAINING_DEFENSES),
                      default="none", help="a training-time defense: " + "; ".join(
                          f"{name}: {entry.help}" for name, entry in
                          registry.TRAINING_DEFENSES.items()))
    clip.add_argument("--pool-size", type=positive_int,
                      help="roclip: captions in the pool (default RoCLIPConfig's 21845)")
    clip.add_argument("--refresh-every", type=positive_int,
                      help="roclip: match images with pooled captions every this many epochs "
                      "(default 2)")
    add_training_flags(clip, "CLIPTrainConfig's (8)", "CLIPTrainConfig")
    clip.add_argument("--out", default="fastbd-out/train-clip", help="output folder")
    clip.set_defaults(run=cmd_train_clip, continued_by_rerun=True, distributed=True)

    evaluate = add_command(sub, "eval", "evaluate saved weights on the synthetic world or on "
                           "your files: linear-probe CA/ASR (ssl) or zero-shot CA/ASR and "
                           "retrieval (clip)", [
                               "fastbd eval ssl --checkpoint fastbd-out/ssl/encoder.pt "
                               "--attack htba",
                               "fastbd eval ssl --arch smallconv16 --checkpoint encoder.pt "
                               "--train-list fastbd-out/htba/train.txt --val-list "
                               "fastbd-out/htba/val.txt --attack htba --target 0",
                               "fastbd eval ssl --arch resnet18 --checkpoint r18.pt "
                               "--train-list train.txt --val-list val.txt --trigger trigger.png",
                               "fastbd eval clip --checkpoint fastbd-out/clip/clip.pt "
                               "--attack badnet",
                               "fastbd eval clip --checkpoint clip.pt --eval-csv val.csv "
                               "--class-names cat,dog,car --attack badnet --target 0"])
    add_world_args(evaluate)
    evaluate.add_argument("kind", choices=("ssl", "clip"),
                          help="an SSL encoder (linear probe) or a CLIP model (zero-shot)")
    evaluate.add_argument("--checkpoint", required=True, help="the weights to evaluate")
    evaluate.add_argument("--arch", help="the checkpoint's architecture (ssl: as train-ssl's, "
                          "default smallconv<--width>; clip: as train-clip's, default tiny)")
    evaluate.add_argument("--attack", choices=ATTACKS + ("none",),
                          help="the trigger whose attack success rate is measured (default and "
                               "'none': the trigger a poisoned model would carry — HTBA for "
                               "ssl, BadNet for clip)")
    evaluate.add_argument("--trigger", help="a trigger image (PNG) pasted as a patch instead "
                          "of --attack's")
    evaluate.add_argument("--attack-spec", help="the attack.json fastbd attack wrote: measure "
                          "the very trigger it planted (attack, seed, trigger size) instead of "
                          "--attack's published settings")
    evaluate.add_argument("--width", type=int, default=16,
                          help="ssl: the small conv encoder's width")
    evaluate.add_argument("--trigger-side", type=float,
                          help="patch trigger side as a fraction of the image side (default "
                               "50/224)")
    evaluate.add_argument("--train-list", help="ssl: clean '<path> <label>' list the linear "
                          "probe learns from (--labelled-fraction of it, stratified)")
    evaluate.add_argument("--labelled-fraction", type=float,
                          help="ssl: share of the probe's training images it learns from, "
                               "stratified, at least one a class (default 0.01 with "
                               "--train-list: the papers' 1 %% probes; 0.10 on the synthetic "
                               "world, whose 5,000 images would give five a class)")
    evaluate.add_argument("--val-list", help="ssl: '<path> <label>' list it is scored on")
    add_pair_csv_flags(evaluate, "--eval-csv", False,
                       "clip: labelled images to score on (image and label columns; a "
                       "caption column adds retrieval)")
    add_shards_flags(evaluate, "clip: labelled pairs to score on (a 'label' in each sample's "
                     "json)")
    evaluate.add_argument("--retrained-checkpoint",
                          help="clip: a model of the same --arch retrained on clean data: adds "
                               "kl_to_retrained, the mean KL(retrained || evaluated) of the "
                               "zero-shot class distributions on the clean images (UBT's "
                               "Table III)")
    evaluate.add_argument("--triggered-csv", help="clip: your own triggered evaluation images "
                          "(image and label columns: each image's true class), scored as they "
                          "are for ASR instead of triggering --eval-csv's images")
    evaluate.add_argument("--class-names", help="clip, --eval-csv: class names in label order, "
                          "comma-separated, a file with one per line, or 'imagenet' (open_clip's "
                          "ImageNet-1k names)")
    evaluate.add_argument("--templates", help="clip, --eval-csv: file of prompt templates, one "
                          "per line with {} for the class name, or 'openai' (the 80 OpenAI "
                          "ImageNet prompts, as the papers evaluate; default: 'a photo of a "
                          "{}.', 'a picture of a {}.', 'an image of a {}.')")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    add_duplicates_flag(evaluate)
    evaluate.add_argument("--out", default="fastbd-out/eval", help="output folder")
    evaluate.set_defaults(run=cmd_eval)

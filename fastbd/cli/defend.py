"""``fastbd ubt`` / ``cleanclip`` / ``abl`` (every registered CLIP defense): defend an open_clip
model with the pairs of a CSV."""

from __future__ import annotations

import argparse
import json

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


def run_clip_defense(args: argparse.Namespace) -> int:
    from fastbd import registry
    from fastbd.configfile import load_config
    from fastbd.distributed import world
    from fastbd.models.clip import load_clip

    entry = registry.clip_defense(args.command)
    config = load_config(args.config, entry.config, entry.nested)
    if entry.needs_reference and (args.reference_checkpoint is None) == (
            args.reference_pretrained is None):
        raise ValueError(f"{args.command} needs one of --reference-checkpoint and "
                         "--reference-pretrained (a clean model)")
    out = prepare_out(args.out)
    model = load_clip(args.arch, args.checkpoint).to(args.device)
    cache = out / ("pairs.npy" if entry.pairs == "training" else "clean_pairs.npy")
    pairs = load_clip_pairs(args, args.csv, model, cache)
    options = {}
    if entry.needs_reference:
        options["reference"] = load_clip(args.reference_arch or args.arch,
                                         args.reference_checkpoint,
                                         pretrained=args.reference_pretrained).to(args.device)
    result = entry.run(model, pairs.images, pairs.tokens, config=config, device=args.device,
                       verbose=not args.quiet, checkpoint_dir=out, **options)
    if not world().main:  # rank 0 writes the result
        return 0
    result.save(out, truth=pairs.truth, tokens=pairs.tokens, tokenizer=pairs.tokenizer)
    if not args.keep_cache:
        remove_pairs_cache(cache)
    summary = {**result.summary(pairs.truth), "pairs": int(pairs.tokens.shape[0]),
               "skipped": pairs.report.skipped, "out": str(out)}
    if not args.quiet:  # the summary is in result.json; --quiet keeps the decision line only
        print(json.dumps(summary, indent=2, default=str))
    print(result.decision(pairs.truth))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd import registry

    for name, entry in registry.CLIP_DEFENSES.items():
        reference = (" --reference-checkpoint clean.pt" if entry.needs_reference else "")
        defense = add_command(sub, name, entry.help, [
            f"fastbd {name} --csv train.csv --checkpoint backdoored.pt{reference} "
            f"--out fastbd-out/{name}",
            f"fastbd {name} --csv pairs.csv --image-key filepath --caption-key title "
            f"--arch ViT-B-32 --checkpoint model.pt{reference} --device cuda",
            f"fastbd {name} --shards 'cc3m/{{00000..00331}}.tar' --arch ViT-B-32 "
            f"--checkpoint model.pt{reference} --device cuda"])
        pairs_help = ("the (possibly poisoned) training pairs" if entry.pairs == "training"
                      else "the clean fine-tuning pairs")
        add_pair_csv_flags(defense, "--csv", False, pairs_help)
        add_shards_flags(defense, pairs_help)
        defense.add_argument("--arch", default="tiny",
                             help="open_clip architecture (e.g. ViT-B-32, RN50) or 'tiny'")
        defense.add_argument("--checkpoint", required=True, help="the model to defend")
        if entry.needs_reference:
            defense.add_argument("--reference-checkpoint",
                                 help="a clean pre-trained model trained on other data than "
                                      "these pairs (this or --reference-pretrained)")
            defense.add_argument("--reference-pretrained",
                                 help="open_clip's pre-trained weights of --reference-arch by "
                                      "tag (e.g. openai: the UBT paper's public reference)")
            defense.add_argument("--reference-arch", help="its architecture (default --arch)")
        defense.add_argument("--image-size", type=int, default=None,
                             help="default: the model's input size")
        defense.add_argument("--config", help="JSON/YAML file with the defense's Config fields")
        defense.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
        defense.add_argument("--keep-cache", action="store_true",
                             help="keep the memory-mapped copy of the images in --out after a "
                                  "successful run (an interrupted run keeps it to resume)")
        add_duplicates_flag(defense)
        defense.add_argument("--out", default=f"fastbd-out/{name}", help="output folder")
        add_device_flag(defense)
        defense.set_defaults(run=run_clip_defense, continued_by_rerun=True, distributed=True)

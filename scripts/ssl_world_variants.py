"""Train the SSL threat model on a variant of the synthetic world and say whether HTBA
implanted a backdoor — the tool behind README "The poisoned world" (issue 3's SSL target).

Besides the linear probe's CA / patched accuracy / ASR it reports what tells a learned backdoor
from a merely salient sticker: how the probe labels the poisoned training images, where it puts
the trigger pasted on blank grey images, and the cosine of patched eval images to the poisoned
images' mean feature, to the clean target images' and to their own clean feature. Run it with
``--attack none`` on the same variant for the clean-model comparison. One JSON line per run
(stdout, and appended to ``--out``).

    python scripts/ssl_world_variants.py --saturation 0 --opacity 1 --epochs 20
"""

import argparse

import torch
import torch.nn.functional as F
from jsonl import emit

from fastbd.data.augment import AugmentConfig
from fastbd.eval.probe import stratified_subset
from fastbd.models.encoders import embed_images
from fastbd.models.linear import fit_linear
from fastbd.training.ssl import SSLConfig
from fastbd.world import SSLThreatConfig, build_ssl_threat
from fastbd.world.synthetic import LAYOUTS, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saturation", type=float, default=0.5, help="background_saturation")
    parser.add_argument("--opacity", type=float, default=0.6, help="object_opacity")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.2, 0.35))
    parser.add_argument("--layout", choices=LAYOUTS, default="single")
    parser.add_argument("--crop", type=float, nargs=2, default=(0.5, 1.0))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--method", choices=("simclr", "byol"), default="simclr")
    parser.add_argument("--attack", choices=("htba", "none"), default="htba")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--trigger-side", type=float, default=None,
                        help="HTBA trigger side as a fraction of the image's (default 50/224)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="fastbd-out/cache")
    parser.add_argument("--out", default="fastbd-out/ssl-world-variants.jsonl")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while training")
    args = parser.parse_args()

    world = WorldConfig(background_saturation=args.saturation, object_opacity=args.opacity,
                        scale=tuple(args.scale), layout=args.layout)
    trigger_options = {} if args.trigger_side is None else {"side_fraction": args.trigger_side}
    config = SSLThreatConfig(world=world, attack=args.attack, fraction=args.fraction,
                             seed=args.seed, trigger_options=trigger_options,
                             ssl=SSLConfig(method=args.method, epochs=args.epochs,
                                           augment=AugmentConfig(crop_scale=tuple(args.crop))))
    threat = build_ssl_threat(config, cache_dir=args.cache, verbose=not args.quiet)
    encoder, labels, target = threat.encoder, threat.world.train.labels, config.target
    n_classes = len(threat.world.class_names)
    subset = stratified_subset(labels, config.probe.labelled_fraction, config.probe.seed)
    probe = fit_linear(embed_images(encoder, threat.world.train.images[subset]), labels[subset],
                       n_classes, config.probe.steps, config.probe.weight_decay)
    trigger = config.trigger()
    size = world.image_size
    blank = (128 + 6 * torch.randn(200, 3, size, size, generator=torch.Generator()
                                   .manual_seed(args.seed))).round().clamp(0, 255)
    on_blank, _ = trigger.apply(blank.to(torch.uint8), torch.Generator().manual_seed(2),
                                train=False)
    evaluation = threat.world.eval
    patched, _ = trigger.apply(evaluation.images, torch.Generator().manual_seed(1), train=False)
    poisoned = threat.poisoned.poison_mask
    with torch.no_grad():
        train_features = embed_images(encoder, threat.poisoned.images)
        clean_features = embed_images(encoder, evaluation.images)
        patched_features = embed_images(encoder, patched)
        blank_votes = torch.bincount(probe(embed_images(encoder, on_blank)).argmax(1),
                                     minlength=n_classes)
        patched_votes = torch.bincount(probe(patched_features).argmax(1), minlength=n_classes)
    other = evaluation.labels != target
    row = {"args": vars(args), "ca": threat.probe.clean_accuracy,
           "patched_accuracy": threat.probe.patched_accuracy, "asr": threat.probe.asr,
           "train_s": threat.train_seconds, "patched_votes": patched_votes.tolist(),
           "blank_trigger_votes": blank_votes.tolist(),
           "patched_to_own": float((patched_features[other] * clean_features[other]).sum(1)
                                   .mean())}
    clean_target = (labels == target) & ~poisoned
    if bool(clean_target.any()):
        target_mean = F.normalize(train_features[clean_target].mean(0), dim=0)
        row["patched_to_target"] = float((patched_features[other] @ target_mean).mean())
    if bool(poisoned.any()):
        poisoned_mean = F.normalize(train_features[poisoned].mean(0), dim=0)
        with torch.no_grad():
            called = probe(train_features[poisoned]).argmax(1)
        row.update(poisoned_called_target=float((called == target).double().mean()),
                   patched_to_poisoned=float((patched_features[other] @ poisoned_mean).mean()))
        if bool(clean_target.any()):
            row["poisoned_to_target"] = float(poisoned_mean @ target_mean)
    emit(row, args.out)


if __name__ == "__main__":
    main()

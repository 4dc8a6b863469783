"""How often HTBA's poisoned images give SimCLR the positive pair a patch backdoor is learned
from, and what the encoder learns when every poisoned pair is that pair — the bounds behind
README "The poisoned world" (issue 3's SSL target).

A data-poisoning backdoor in contrastive learning is learned from positive pairs whose one view
shows the trigger without the target object and whose other view shows the object without the
trigger (CorruptEncoder, Zhang et al., CVPR 2024; Noisy Alignment, Chen et al., ICCV 2025).

* ``crop_pairs``: for the world's poisoned images, the share of SimCLR view pairs (the library's
  own ``crop_windows``) that separate trigger and object — one view with ≥ 75 % of the trigger
  and ≤ 25 % of the object, the other the reverse — for several crop-scale ranges.
* ``oracle``: trains the SSL threat model on the same world while ``--share`` of the poisoned
  images' positive pairs are replaced by exactly that pair at the image's own scale (view 1: the
  image with the object painted over in its mean colour; view 2: with the trigger painted over;
  both then augmented as usual; in the tiled layout the object is every pixel outside the
  trigger, and the crop-pair count is skipped), and reports the linear probe's CA and ASR.
  ``--share 0`` is plain HTBA on the same world. ``--detect`` then runs PoisonCAM (the demo
  config) on the trained encoder: how it fares once the encoder really carries the backdoor.

One JSON line per run (stdout, and appended to ``--out``).

    python scripts/ssl_htba_bounds.py --share 1.0 --epochs 20
"""

import argparse

import torch
from jsonl import emit

from fastbd.attacks import make_attack
from fastbd.data.augment import AugmentConfig, augment, crop_windows
from fastbd.demo.poisoncam import demo_config
from fastbd.eval.probe import ProbeConfig, linear_probe
from fastbd.models.encoders import small_encoder
from fastbd.poisoncam import detect
from fastbd.training.ssl import SSLConfig, train_ssl
from fastbd.world import poison_world_images
from fastbd.world.synthetic import LAYOUTS, WorldConfig, make_world

SEPARATED, HIDDEN = 0.75, 0.25
CROP_SCALES = ((0.5, 1.0), (0.2, 1.0), (0.08, 1.0), (0.05, 0.4))


def visible(boxes: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Share of each box (float ``N×4`` y0, x0, y1, x1 in px) inside its crop window
    (``crop_windows``' ``N×2×3`` theta)."""
    half_w, half_h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    crop = torch.stack([theta[:, 1, 2] - half_h, theta[:, 0, 2] - half_w,
                        theta[:, 1, 2] + half_h, theta[:, 0, 2] + half_w], 1)
    crop = (crop + 1) / 2 * size
    high = torch.minimum(boxes[:, 2:], crop[:, 2:])
    low = torch.maximum(boxes[:, :2], crop[:, :2])
    inside = (high - low).clamp(min=0).prod(1)
    return inside / (boxes[:, 2:] - boxes[:, :2]).prod(1)


def crop_pairs(object_boxes: torch.Tensor, trigger_boxes: torch.Tensor, size: int,
               draws: int, seed: int) -> dict[str, float]:
    """Share of separating view pairs per crop-scale range, over ``draws`` pairs per image."""
    g = torch.Generator().manual_seed(seed)
    objects, triggers = object_boxes.repeat(draws, 1), trigger_boxes.repeat(draws, 1)
    n, ratio = objects.shape[0], AugmentConfig().crop_ratio
    shares = {}
    for scale in CROP_SCALES:
        first = crop_windows(n, scale, ratio, 0.0, g)
        second = crop_windows(n, scale, ratio, 0.0, g)
        t1, o1 = visible(triggers, first, size), visible(objects, first, size)
        t2, o2 = visible(triggers, second, size), visible(objects, second, size)
        one_way = (t1 >= SEPARATED) & (o1 <= HIDDEN) & (o2 >= SEPARATED) & (t2 <= HIDDEN)
        other_way = (t2 >= SEPARATED) & (o2 <= HIDDEN) & (o1 >= SEPARATED) & (t1 <= HIDDEN)
        shares[f"{scale[0]}-{scale[1]}"] = float((one_way | other_way).double().mean())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saturation", type=float, default=0.0, help="background_saturation")
    parser.add_argument("--opacity", type=float, default=1.0, help="object_opacity")
    parser.add_argument("--layout", choices=LAYOUTS, default="single")
    parser.add_argument("--scale", type=float, nargs=2, default=None,
                        help="object (tiled: tile) scale range; the world's default if unset")
    parser.add_argument("--crop", type=float, nargs=2, default=(0.2, 1.0))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--share", type=float, default=1.0,
                        help="share of the poisoned images' pairs replaced by the separated pair")
    parser.add_argument("--draws", type=int, default=200, help="crop pairs per poisoned image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastbd-out/ssl-htba-bounds.jsonl")
    parser.add_argument("--detect", action="store_true",
                        help="also run PoisonCAM (demo config) on the trained encoder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if not 0 <= args.share <= 1:
        parser.error("--share must be in [0, 1]")

    world_config = WorldConfig(background_saturation=args.saturation,
                               object_opacity=args.opacity, layout=args.layout)
    if args.scale is not None:
        world_config.scale = tuple(args.scale)
    world = make_world(world_config)
    poisoned = poison_world_images(world, "htba", 0, args.fraction, args.seed)
    size = world_config.image_size
    rows = poisoned.poison_mask.nonzero().squeeze(1)
    centres = world.train.centers
    trigger_boxes = torch.cat([poisoned.boxes[:, :2], poisoned.boxes[:, :2]
                               + poisoned.boxes[:, 2:]], 1).float()
    row = {"args": vars(args)}
    yy = torch.arange(size, dtype=torch.float32)[None, :, None] + 0.5
    xx = torch.arange(size, dtype=torch.float32)[None, None, :] + 0.5
    if args.layout == "tiled":
        object_mask = torch.ones(len(centres), size, size, dtype=torch.bool)
    else:
        radius = 0.5 * world_config.scale[1] * size  # bounds every shape's extent
        object_boxes = torch.cat([centres - radius, centres + radius], 1)
        row["separated_pairs"] = crop_pairs(object_boxes[rows], trigger_boxes[rows], size,
                                            args.draws, args.seed)
        object_mask = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
                       < radius ** 2)
    box = trigger_boxes[:, :, None, None]
    trigger_mask = (yy >= box[:, 0]) & (yy < box[:, 2]) & (xx >= box[:, 1]) & (xx < box[:, 3])
    fill = poisoned.images.float().mean((2, 3), keepdim=True).round().to(torch.uint8)
    trigger_only = torch.where((object_mask & ~trigger_mask)[:, None], fill, poisoned.images)
    object_only = torch.where(trigger_mask[:, None], fill, poisoned.images)

    ssl = SSLConfig(epochs=args.epochs, augment=AugmentConfig(crop_scale=tuple(args.crop)),
                    seed=args.seed)
    encoder = small_encoder(16, size, seed=args.seed)
    mean = torch.tensor(encoder.mean)[:, None, None]
    std = torch.tensor(encoder.std)[:, None, None]
    g = torch.Generator().manual_seed(args.seed + 1)

    def separated_pairs(index, v1, v2):
        chosen = poisoned.poison_mask[index] & (torch.rand(len(index), generator=g) < args.share)
        if bool(chosen.any()):
            picked = index[chosen]
            v1[chosen] = augment(trigger_only[picked], ssl.augment, mean, std, g)
            v2[chosen] = augment(object_only[picked], ssl.augment, mean, std, g)
        return v1, v2

    history = train_ssl(encoder, poisoned.images, ssl, verbose=not args.quiet,
                        view_hook=separated_pairs)
    probe = linear_probe(encoder, world.train.images, world.train.labels, world.eval.images,
                         world.eval.labels, make_attack("htba", size, seed=args.seed), 0,
                         ProbeConfig(), "cpu")
    row.update(ca=probe.clean_accuracy, patched_accuracy=probe.patched_accuracy, asr=probe.asr,
               train_s=history.seconds)
    if args.detect:
        result = detect(encoder, poisoned.images, demo_config(args.seed),
                        ground_truth=poisoned.poison_mask, true_boxes=poisoned.boxes,
                        verbose=not args.quiet)
        metrics = result.metrics
        row["poisoncam"] = {
            "precision": metrics.precision, "recall": metrics.recall,
            "removed": int(result.removed.sum()), "top20": result.topk_accuracy,
            "trigger_overlap": result.trigger_scores.get("topk_trigger_overlap", 0.0)}
    emit(row, args.out)


if __name__ == "__main__":
    main()

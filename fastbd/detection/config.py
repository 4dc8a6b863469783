"""PoisonCAM hyperparameters: the paper's ImageNet-100 defaults, scaled for small data."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace

import torch

from fastbd.data.bank import BANK_PLACEMENTS
from fastbd.ops.mask_fill import STRATEGIES as MASK_STRATEGIES
from fastbd.validation import above, at_least, check_fields, fraction, one_of, ordered_range

PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ClassifierConfig:
    """Poison classifier (PatchSearch's recipe): an ensemble of ``n_models`` ResNets with one
    BasicBlock per stage, trained from scratch with SGD (lr, momentum, weight decay, cosine) for
    at most ``iterations`` steps of ``batch_size``; validated every ``val_every`` steps on the
    top-k poisons vs the bottom-k images; stopped when the last ``patience`` F1 values (integer
    %) are equal. Pasted triggers are ``paste_size`` px at the 224-px reference size, placed at
    least ``paste_margin`` px from the border, with probability ``paste_p``.

    fastbd's two additions (docs/methods.md, "The poison classifier"; ``pool_cleaning_rounds=0,
    threshold="argmax"`` is the papers' recipe): *pool cleaning* — ``pool_cleaning_rounds``
    times, a logistic regression (L-BFGS, ``feature_steps``, ``feature_weight_decay``) on the
    threat encoder's own normalised features of ``feature_samples`` pool images, half of them
    with a pasted trigger, rates the pool and the ``pool_cleaning_fraction`` it rates most
    poisonous is dropped; and the *threshold* — ``otsu`` removes the images whose ensemble
    margin (poison logit − clean logit) lies above Otsu's threshold of all N margins,
    ``argmax`` those with a positive margin.

    ``recipe="published"`` trains as PatchSearch's official code does (docs/methods.md,
    "PatchSearch as published"): torchvision's 7×7 + max-pool stem at any size, half-open
    ranges for the pasted trigger's side and corner, the pool read in shuffled passes, validation
    after the first update and every ``val_every`` after it with the F1 truncated to integer %
    and the stop after more than ``patience`` validations, and each member weighted in the
    ensemble by the passes over the pool it started.

    In a ``torch.distributed`` world the members are dealt over the ranks, and the ensemble is
    the single process's exactly; with fewer members than ranks the others wait. With
    ``data_parallel`` every rank then trains every member on its shard of each batch instead —
    faster, and equal to one process's up to rounding, which this small SGD training amplifies
    about as much as another CPU thread count does (docs/scaling.md).
    """

    n_models: int = 5
    iterations: int = 2000
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_every: int = 20
    patience: int = 10
    paste_p: float = 0.5
    paste_size: tuple[int, int] = (20, 80)
    paste_margin: int = 10
    crop_scale: tuple[float, float] = (0.2, 1.0)
    width: int = 64
    feature_samples: int = 4000
    feature_steps: int = 100
    feature_weight_decay: float = 1e-4
    pool_cleaning_rounds: int = 1
    pool_cleaning_fraction: float = 0.1
    threshold: str = "otsu"
    recipe: str = "fastbd"
    data_parallel: bool = False

    def __post_init__(self) -> None:
        check_fields(
            self, n_models=at_least(1), iterations=at_least(1), batch_size=at_least(2),
            lr=above(0), momentum=fraction(high_open=True), weight_decay=at_least(0),
            val_every=at_least(1), patience=at_least(1), paste_p=fraction(),
            paste_size=ordered_range(1), paste_margin=at_least(0),
            crop_scale=ordered_range(0, 1, low_open=True), width=at_least(1),
            feature_samples=at_least(2), feature_steps=at_least(1),
            feature_weight_decay=at_least(0), pool_cleaning_rounds=at_least(0),
            pool_cleaning_fraction=fraction(high_open=True),
            threshold=one_of("otsu", "argmax"), recipe=one_of("fastbd", "published"))


@dataclass
class Config:
    """Every PoisonCAM knob. Sizes in pixels are given at ``reference_size`` (224) and scaled to
    the images' size by ``scaled``.

    * clustering: ``n_clusters`` k-means clusters (at most ``N · max_cluster_fraction``),
      ``kmeans_iters`` Lloyd iterations, cosine metric;
    * masking: ``n_masks`` windows of ``window`` px per image, ``mask_strategy``
      (full/interval/random with ``mask_block`` px blocks), ``fill`` in normalised space;
    * flip test: ``test_set_size`` test images, ``candidates_per_batch`` candidates per encoder
      pass; ``flip_test``: ``exhaustive`` (the papers': every candidate on every test image)
      or ``sequential`` (``fastbd.detection.flip.sequential_flip_counts``: test images in
      doubling slices, a candidate stopped once a Chernoff (KL) upper bound on its score falls
      below the ``topk_poisons``-th best, each bound failing with probability at most
      ``flip_error``; a candidate tested to the end gets its exhaustive score);
    * search: ``samples_per_cluster`` new images per remaining cluster per round, the lowest
      ``prune_fraction`` of clusters dropped per round (at least one), ``topk_poisons``; each
      round's images are scored in blocks of ``search_block``, each with a random stream of its
      own — the unit dealt to the ranks of a ``torch.distributed`` world (docs/scaling.md), so
      the result depends on the block size but never on the number of ranks; smaller blocks
      spread a round's few images over more ranks;
    * classifier: the top ``drop_top_fraction`` by score are left out of its training pool;
    * ``precision`` of the clustering features, masked views and flip tests: ``fp32``, ``bf16``
      (a bfloat16 copy of the encoder, and ``mask_fill`` / ``paste`` write bfloat16 input), or
      ``auto`` — bf16 on CUDA, fp32 elsewhere; the result records the one used;
    * ``search_budget_tflop``: when set, the cluster count is lowered until the search's
      estimated compute (``expected_scored`` images × the encoder passes each costs × the
      encoder's FLOPs per image, counted once per run) fits it — a function of the data and the
      config only, so the same command gives the same search on any machine at any load; the
      plan (with the measured throughput's time estimate, for information) is logged and kept
      in ``DetectionResult.plan`` (a resumed search keeps the saved run's cluster count);
    * ``warn_removed_fraction``: a result that removes more than this share of the images is
      flagged implausible (published poison rates are 0.5–10 %), as is one whose decision
      threshold lies at a negative margin or whose classifier removes fewer than half of the
      search's top-k (``DetectionResult.warnings``);
    * ``check``: before anything is removed, decide whether there is a backdoor at all
      (``backdoor_check``): each top-k candidate's duel with the test images — the share it
      pulls into one cluster, minus what ordinary windows pull into theirs (the upper
      quartile of the test images' own windows' shares), minus the share of the
      test images' own windows that move its image — and a backdoor when the median reaches
      ``check_threshold`` (½). Below it the result removes nothing and says so
      (``DetectionResult.backdoor``);
    * ``exported_patches``: the candidate windows of the best-scored images written one PNG
      each (``all_top_poison_patches/``, PatchSearch's layout, which its classifier reads);
    * ``bank_placement`` of the images: ``device`` (moved there whole), ``host`` (left in host
      memory, e.g. memory-mapped, and copied in per batch) or ``auto`` — on the device when
      they are already there or take at most half its free memory
      (``fastbd.data.bank.bank_placement``).
    """

    n_clusters: int = 1000
    max_cluster_fraction: float = 0.1
    kmeans_iters: int = 20
    n_masks: int = 256
    window: int = 60
    mask_strategy: str = "full"
    mask_block: int = 10
    fill: float = 0.0
    test_set_size: int = 1000
    candidates_per_batch: int = 16
    flip_test: str = "exhaustive"
    flip_error: float = 1e-3
    samples_per_cluster: int = 2
    search_block: int = 4
    prune_fraction: float = 0.25
    topk_poisons: int = 20
    drop_top_fraction: float = 0.10
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    reference_size: int = 224
    batch_size: int = 512
    precision: str = "auto"
    bank_placement: str = "auto"
    exported_patches: int = 100
    search_budget_tflop: float | None = None
    warn_removed_fraction: float = 0.2
    check: bool = True
    check_threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(
            self, n_clusters=at_least(2), max_cluster_fraction=fraction(low_open=True),
            kmeans_iters=at_least(1), n_masks=at_least(1), window=at_least(1),
            mask_strategy=one_of(*MASK_STRATEGIES), mask_block=at_least(1),
            test_set_size=at_least(1), candidates_per_batch=at_least(1),
            flip_test=one_of("exhaustive", "sequential"),
            flip_error=fraction(low_open=True, high_open=True),
            samples_per_cluster=at_least(1), search_block=at_least(1),
            prune_fraction=fraction(high_open=True),
            topk_poisons=at_least(1), drop_top_fraction=fraction(high_open=True),
            reference_size=at_least(1), batch_size=at_least(1), precision=one_of(*PRECISIONS),
            bank_placement=one_of(*BANK_PLACEMENTS), exported_patches=at_least(0),
            search_budget_tflop=above(0), warn_removed_fraction=fraction(),
            check_threshold=fraction(low_open=True),
            seed=at_least(0))

    def for_device(self, device: torch.device) -> Config:
        """This config with an ``auto`` precision resolved for ``device`` (bf16 on CUDA, fp32
        elsewhere); ``PRECISIONS[config.precision]`` is then the encoder dtype."""
        if self.precision != "auto":
            return self
        return replace(self, precision="bf16" if device.type == "cuda" else "fp32")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def pixels(self, value: int, image_size: int) -> int:
        """A reference-size pixel count at ``image_size`` (at least 1)."""
        return max(1, round(value * image_size / self.reference_size))

    def scaled(self, n_images: int, image_size: int) -> Config:
        """The config for ``n_images`` images of ``image_size`` px: clusters capped at
        ``n_images · max_cluster_fraction`` (at least 2), the test set at ``n_images``, window,
        mask blocks and classifier paste sizes scaled by ``image_size / reference_size``.
        Raises when the data cannot support the search."""
        if n_images < 2:
            raise ValueError(f"PoisonCAM needs at least 2 images, got {n_images}")
        clusters = max(2, min(self.n_clusters, int(n_images * self.max_cluster_fraction)))
        if clusters > n_images:
            raise ValueError(f"{n_images} images cannot form {clusters} clusters")
        if self.topk_poisons * 2 > n_images:
            raise ValueError(f"topk_poisons={self.topk_poisons} needs at least "
                             f"{2 * self.topk_poisons} images, got {n_images}")
        classifier = replace(
            self.classifier,
            paste_size=(self.pixels(self.classifier.paste_size[0], image_size),
                        self.pixels(self.classifier.paste_size[1], image_size)),
            paste_margin=round(self.classifier.paste_margin * image_size / self.reference_size))
        return replace(self, n_clusters=clusters, test_set_size=min(self.test_set_size,
                                                                    n_images),
                       window=min(image_size, self.pixels(self.window, image_size)),
                       mask_block=self.pixels(self.mask_block, image_size),
                       classifier=classifier, reference_size=image_size)


FAST_SEARCH_TFLOP = 12.0
"""The ``fast`` preset's search budget: about ten minutes of a 2-core AVX2 CPU, whose encoder
forwards run at 18–28 effective GFLOP/s (measured: smallconv16 at 32 px, ResNet-18 at 64 and
224 px, two threads)."""

PRESETS: dict[str, Config] = {
    "paper": Config(),
    "fast": Config(n_masks=64, test_set_size=150, search_budget_tflop=FAST_SEARCH_TFLOP,
                   classifier=ClassifierConfig(n_models=1, iterations=300, width=16,
                                               batch_size=64, paste_size=(40, 80))),
}
"""Starting points for ``Config``. ``paper``: the papers' ImageNet-100 settings (an ensemble of
five width-64 ResNets trained up to 2,000 steps — 34 of the 35 minutes a 600-image, 32-px set
took on two CPU cores). ``fast``: the demo's recipe for CPUs — 64 masks, 150 flip-test images,
one width-16 ResNet of at most 300 steps of 64 on the cleaned pool, triggers pasted at 40–80 px
of 224 (docs/methods.md, "The poison classifier")."""


def preset(name: str) -> Config:
    """A copy of ``PRESETS[name]``; an unknown name raises ``ValueError`` listing the known."""
    if name not in PRESETS:
        raise ValueError(f"unknown PoisonCAM preset {name!r}; known: {', '.join(PRESETS)}")
    return deepcopy(PRESETS[name])

"""The detectors, CLIP defenses and training-time CLIP defenses fastbd offers, by name: what
the ``fastbd`` command and the demos look methods up in. A new one is a new package plus one
``register_*`` line in ``_register_builtins`` (docs/contributing.md); code outside fastbd can
call ``register_*`` itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastbd.detection import Config, Detector


@dataclass(frozen=True)
class DetectorEntry:
    """``factory(config) -> Detector`` and a one-line ``help``."""

    factory: Callable[[Config | None], Detector]
    help: str


@dataclass(frozen=True)
class ClipDefenseEntry:
    """A CLIP defense: ``run(model, images, tokens, *, config, device, verbose,
    checkpoint_dir[, reference]) -> DefenseResult``, its ``config`` class (``nested``: fields
    holding config classes of their own, for config files), whether it needs a clean
    ``reference`` model, what its pairs are (``training``: the possibly poisoned training set;
    ``clean``: a clean fine-tuning set) and a one-line ``help``."""

    run: Callable
    config: type
    needs_reference: bool
    pairs: str
    help: str
    nested: dict[str, type] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingDefenseEntry:
    """A training-time CLIP defense: ``objective(config) -> TrainingObjective`` for
    ``fastbd.training.clip.train_clip``, its ``config`` class and a one-line ``help``."""

    objective: Callable
    config: type
    help: str


DETECTORS: dict[str, DetectorEntry] = {}
CLIP_DEFENSES: dict[str, ClipDefenseEntry] = {}
TRAINING_DEFENSES: dict[str, TrainingDefenseEntry] = {}


def register_detector(name: str, entry: DetectorEntry) -> None:
    """Offer detector ``name`` (refuses a name already taken)."""
    if name in DETECTORS:
        raise ValueError(f"a detector named {name!r} is already registered")
    DETECTORS[name] = entry


def register_clip_defense(name: str, entry: ClipDefenseEntry) -> None:
    """Offer CLIP defense ``name`` (refuses a name already taken)."""
    if name in CLIP_DEFENSES:
        raise ValueError(f"a CLIP defense named {name!r} is already registered")
    if entry.pairs not in ("training", "clean"):
        raise ValueError(f"pairs must be 'training' or 'clean', got {entry.pairs!r}")
    CLIP_DEFENSES[name] = entry


def register_training_defense(name: str, entry: TrainingDefenseEntry) -> None:
    """Offer training-time CLIP defense ``name`` (refuses a name already taken)."""
    if name in TRAINING_DEFENSES or name == "none":
        raise ValueError(f"a training-time defense named {name!r} is already registered")
    TRAINING_DEFENSES[name] = entry


def training_defense(name: str) -> TrainingDefenseEntry:
    """The registered training-time defense ``name``; an unknown name raises ``ValueError``."""
    if name not in TRAINING_DEFENSES:
        raise ValueError(f"unknown training-time defense {name!r}; known: "
                         f"{', '.join(TRAINING_DEFENSES)}")
    return TRAINING_DEFENSES[name]


def detector(name: str, config: Config | None = None) -> Detector:
    """The registered detector ``name`` with ``config``; an unknown name raises ``ValueError``
    listing the known ones."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name].factory(config)


def clip_defense(name: str) -> ClipDefenseEntry:
    """The registered CLIP defense ``name``; an unknown name raises ``ValueError``."""
    if name not in CLIP_DEFENSES:
        raise ValueError(f"unknown CLIP defense {name!r}; known: {', '.join(CLIP_DEFENSES)}")
    return CLIP_DEFENSES[name]


def _register_builtins() -> None:
    from fastbd.baselines import (
        ABLConfig,
        ABLPaperConfig,
        CleanCLIPConfig,
        RoCLIPConfig,
        RoCLIPObjective,
        abl,
        cleanclip,
    )
    from fastbd.data.augment import AugmentConfig
    from fastbd.patchsearch import PatchSearch, PublishedPatchSearch
    from fastbd.poisoncam import PoisonCAM
    from fastbd.ubt import Config as UBTConfig
    from fastbd.ubt import defend

    register_detector("poisoncam", DetectorEntry(
        PoisonCAM, "find poisoned images by cluster activation masking (PoisonCAM)"))
    register_detector("patchsearch", DetectorEntry(
        PatchSearch, "find poisoned images by Grad-CAM patch search (PatchSearch, baseline; "
        "fastbd's corrected variant)"))
    register_detector("patchsearch-published", DetectorEntry(
        PublishedPatchSearch, "PatchSearch with every behaviour of its authors' code, "
        "including its bugs (for comparisons with published figures)"))
    register_clip_defense("ubt", ClipDefenseEntry(
        defend, UBTConfig, True, "training",
        "purify a backdoored CLIP by token-level unlearning (UBT)"))
    register_clip_defense("cleanclip", ClipDefenseEntry(
        cleanclip, CleanCLIPConfig, False, "clean",
        "CleanCLIP fine-tuning on clean pairs (baseline)", {"augment": AugmentConfig}))
    register_clip_defense("abl", ClipDefenseEntry(
        abl, ABLConfig, True, "training",
        "ABL gradient ascent on the suspicious pairs (baseline, UBT's schedule)"))
    register_clip_defense("abl-paper", ClipDefenseEntry(
        abl, ABLPaperConfig, True, "training",
        "ABL as the UBT paper runs it: fixed 1 %% split, batch 64, lr 1e-6, 10 epochs"))
    register_training_defense("roclip", TrainingDefenseEntry(
        RoCLIPObjective, RoCLIPConfig, "train against a pool of captions, each image matched "
        "with its nearest pooled caption every few epochs (RoCLIP, baseline)"))


_register_builtins()

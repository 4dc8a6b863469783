"""Attacks: trigger functions and dataset poisoning with ground truth (DESIGN.md §8)."""

from fastbd.attacks.corruptencoder import (
    CorruptEncoderConfig,
    poison_corrupt_encoder,
    poison_corrupt_encoder_targets,
)
from fastbd.attacks.optimised import clip_target_patch, optimise_patch
from fastbd.attacks.poison import (
    DEFAULT_PAIR_RATE,
    PoisonedImages,
    PoisonedPairs,
    poison_pairs,
    poison_target_class,
    poison_target_classes,
    target_caption,
)
from fastbd.attacks.triggers import (
    ATTACKS,
    CLIP_ATTACKS,
    SSL_ATTACKS,
    Attack,
    BlendedAttack,
    PatchAttack,
    SigAttack,
    WanetAttack,
    htba_patterns,
    make_attack,
)

__all__ = ["ATTACKS", "CLIP_ATTACKS", "DEFAULT_PAIR_RATE", "SSL_ATTACKS", "Attack",
           "BlendedAttack", "CorruptEncoderConfig", "PatchAttack", "clip_target_patch",
           "optimise_patch", "poison_corrupt_encoder",
           "poison_corrupt_encoder_targets",
           "PoisonedImages", "PoisonedPairs", "SigAttack", "WanetAttack", "htba_patterns",
           "make_attack", "poison_pairs", "poison_target_class", "poison_target_classes",
           "target_caption"]

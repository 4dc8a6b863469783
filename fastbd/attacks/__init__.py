"""Attacks: trigger functions and dataset poisoning with ground truth (DESIGN.md §8)."""

from fastbd.attacks.poison import (
    DEFAULT_PAIR_RATE,
    PoisonedImages,
    PoisonedPairs,
    poison_pairs,
    poison_target_class,
    target_caption,
)
from fastbd.attacks.triggers import (
    ATTACKS,
    Attack,
    BlendedAttack,
    PatchAttack,
    SigAttack,
    WanetAttack,
    htba_patterns,
    make_attack,
)

__all__ = ["ATTACKS", "DEFAULT_PAIR_RATE", "Attack", "BlendedAttack", "PatchAttack",
           "PoisonedImages", "PoisonedPairs", "SigAttack", "WanetAttack", "htba_patterns",
           "make_attack", "poison_pairs", "poison_target_class", "target_caption"]

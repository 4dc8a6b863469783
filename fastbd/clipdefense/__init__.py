"""What every CLIP defense shares (UBT, CleanCLIP, ABL and new ones): pair-set checks, pair
similarities and the suspicious split, resumable stages, caption-token rebuilding and the
``DefenseResult`` type."""

from fastbd.clipdefense.pairs import (
    SPLIT_RULES,
    check_pairs,
    defense_stages,
    saved_split,
    similarities,
    stage_epochs,
    suspicious_split,
)
from fastbd.clipdefense.result import DefenseResult, as_truth
from fastbd.clipdefense.tokens import masked_tokens, word_positions

__all__ = ["SPLIT_RULES", "DefenseResult", "as_truth", "check_pairs", "defense_stages",
           "masked_tokens", "saved_split", "similarities", "stage_epochs", "suspicious_split",
           "word_positions"]

"""CLIP defenses compared against UBT (DESIGN.md §7): CleanCLIP and ABL."""

from fastbd.baselines.abl import ABLConfig, ABLPaperConfig, abl
from fastbd.baselines.cleanclip import CleanCLIPConfig, augment_tokens, cleanclip

__all__ = ["ABLConfig", "ABLPaperConfig", "CleanCLIPConfig", "abl", "augment_tokens", "cleanclip"]

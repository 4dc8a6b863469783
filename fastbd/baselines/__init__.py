"""CLIP defenses compared against UBT (DESIGN.md §7): CleanCLIP and ABL (post-training) and
RoCLIP (training-time)."""

from fastbd.baselines.abl import ABLConfig, ABLPaperConfig, abl
from fastbd.baselines.cleanclip import CleanCLIPConfig, augment_tokens, cleanclip
from fastbd.baselines.roclip import CaptionPool, RoCLIPConfig, RoCLIPObjective, train_roclip

__all__ = ["ABLConfig", "ABLPaperConfig", "CaptionPool", "CleanCLIPConfig", "RoCLIPConfig",
           "RoCLIPObjective", "abl", "augment_tokens", "cleanclip", "train_roclip"]

"""UBT: backdoor purification of CLIP models by token-level unlearning (DESIGN.md §6)."""

from fastbd.clipdefense.relevance import token_relevance
from fastbd.ubt.defend import Config, defend
from fastbd.ubt.result import UBTResult

__all__ = ["Config", "UBTResult", "defend", "token_relevance"]

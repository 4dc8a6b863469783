"""UBT: backdoor purification of CLIP models by token-level unlearning (DESIGN.md §6)."""

from fastbd.ubt.defend import Config, defend, suspicious_split
from fastbd.ubt.relevance import masked_tokens, token_relevance
from fastbd.ubt.result import DefenseResult, UBTResult

__all__ = ["Config", "DefenseResult", "UBTResult", "defend", "masked_tokens",
           "suspicious_split", "token_relevance"]

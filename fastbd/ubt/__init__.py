"""UBT: backdoor purification of CLIP models by token-level unlearning (DESIGN.md §6)."""

from fastbd.ubt.defend import Config, UBTResult, defend
from fastbd.ubt.relevance import masked_tokens, token_relevance

__all__ = ["Config", "UBTResult", "defend", "masked_tokens", "token_relevance"]

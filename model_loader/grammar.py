"""Constrained decoding on the transformers engine: llguidance masks each step to what the grammar allows.

The grammar is the one the API compiled to check the request (core.constraints); llguidance walks
it token by token on the CPU, beside the model, and its mask sets every other token's logit to
-inf before temperature, top-k and top-p see them, so sampling can only pick a token that keeps
the answer inside the grammar, and once the grammar is complete, only an end-of-sequence token.
An answer another attempt began is fed to the grammar first, which rebuilds its state exactly.
"""

import json

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from core.constraints import gbnf_grammar, schema_grammar
from model_loader.contract import SamplingParams


def grammar_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (about a second to build: once per engine), as wide as the
    model's logits, which may count padding ids the tokenizer lacks."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)


def grammar_of(params: SamplingParams) -> str:
    if params.json_schema is not None:
        return schema_grammar(json.loads(params.json_schema))
    assert params.grammar is not None
    return gbnf_grammar(params.grammar)


class GrammarMask(LogitsProcessor):
    """One answer's grammar as a logits processor for `model.generate` (a batch of one)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, answer: list[int]) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if answer and not self._matcher.consume_tokens(answer):
            raise ValueError(f"the answer begun does not match its grammar: {self._matcher.get_error()}")
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Called before each new token: the token sampled last goes to the grammar first."""
        if self._started and not self._matcher.consume_token(int(input_ids[0, -1])):
            raise RuntimeError(f"a token outside the grammar was sampled: {self._matcher.get_error()}")
        self._started = True
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: scores.shape[-1]].astype(bool)
        scores[:, torch.from_numpy(~allowed)] = float("-inf")
        return scores

"""Constrained decoding on the transformers engines: llguidance masks each step to what the grammar allows.

The grammar is the one the API compiled to check the request (core.constraints); llguidance walks
it token by token on the CPU, beside the model, and its mask sets every other token's logit to
-inf before temperature, top-k and top-p see them, so sampling can only pick a token that keeps
the answer inside the grammar, and once the grammar is complete, only an end-of-sequence token.
An answer another attempt began is fed to the grammar first, which rebuilds its state exactly.
"""

import json
import threading
from collections.abc import Sequence

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from core.constraints import gbnf_grammar, schema_grammar
from model_loader.contract import SamplingParams


class Grammar:
    """One answer's grammar: told the answer so far at each step, it masks the next token's scores."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        self._fed = 0

    def follow(self, answer: Sequence[int]) -> None:
        """Feed the grammar the tokens sampled since the last step (all of them at the first)."""
        new = list(answer[self._fed :])
        if new and not self._matcher.consume_tokens(new):
            raise RuntimeError(f"the answer does not match its grammar: {self._matcher.get_error()}")
        self._fed = len(answer)

    def mask(self, scores: torch.Tensor) -> None:
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: scores.shape[-1]].astype(bool)
        scores[torch.from_numpy(~allowed).to(scores.device)] = float("-inf")


class Grammars:
    """Each answer's `Grammar`, on the tokenizer as llguidance sees it (about a second to build: once per
    engine, at the first constrained request), as wide as the model's logits, which may count padding
    ids the tokenizer lacks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def of(self, params: SamplingParams) -> Grammar | None:
        if not params.constrained:
            return None
        with self._lock:
            if self._built is None:
                self._built = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids)
        return Grammar(self._built, _grammar_text(params))


def _grammar_text(params: SamplingParams) -> str:
    if params.json_schema is not None:
        return schema_grammar(json.loads(params.json_schema))
    assert params.grammar is not None
    return gbnf_grammar(params.grammar)

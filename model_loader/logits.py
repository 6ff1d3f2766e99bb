"""One answer's own work on the model's next-token scores, for both transformers engines.

`generate` (one answer at a time) and continuous batching (a row of scores per request) both hand
each step's row to the answer's `AnswerLogits`, before temperature, top-k and top-p: it keeps the
log probabilities as the model gave them (as llama.cpp and vLLM report them), then applies the
repetition, presence and frequency penalties, logit_bias and the grammar's mask. It is told the
answer so far at every step, so a grammar or a penalty follows the tokens actually sampled,
whichever engine sampled them, and an answer another attempt began is simply its first tokens.
"""

from collections import deque
from collections.abc import Sequence

import torch

from model_loader.contract import SamplingParams, TokenLogprob
from model_loader.grammar import Grammar, Grammars


class AnswerLogits:
    """What one answer asks of each step beyond temperature, top-k and top-p."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], begun: list[int], vocab_size: int, grammar: Grammar | None
    ) -> None:
        self._params = params
        self._begun = list(begun)
        self._prompt = torch.tensor(prompt_ids, dtype=torch.long)
        self._bias = torch.zeros(vocab_size)
        for token_id, bias in params.logit_bias:
            self._bias[token_id] = bias
        self._grammar = grammar
        # Each step's log probabilities until the engine reports the token sampled from them: the sampling
        # (batched, on another thread) may run a step or two ahead of the reporting.
        self._steps: deque[torch.Tensor] = deque()
        self.failed: str | None = None  # why a batched step could not process it (it fails its task alone)

    def step(self, generated: Sequence[int], scores: torch.Tensor) -> None:
        """Process, in place, the scores (one row: the vocabulary) of the token after `generated`, the
        tokens this attempt has sampled so far."""
        answer = self._begun + list(generated)
        if self._params.logprobs is not None:
            self._steps.append(torch.log_softmax(scores.float(), dim=-1))
        self._penalize(answer, scores)
        if self._params.logit_bias:
            width = min(len(self._bias), scores.shape[-1])
            scores[:width] += self._bias[:width].to(scores.device, scores.dtype)
        if self._grammar is not None:
            self._grammar.follow(answer)
            self._grammar.mask(scores)

    def logprob(self, token_id: int) -> TokenLogprob | None:
        """The sampled token's log probability and the likeliest alternatives, from its step's scores."""
        if self._params.logprobs is None:
            return None
        logprobs = self._steps.popleft()
        top = self._params.logprobs
        values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0])
        return TokenLogprob(float(logprobs[token_id]), [(int(i), float(v)) for i, v in zip(ids, values)])

    def _penalize(self, answer: list[int], scores: torch.Tensor) -> None:
        """transformers' repetition penalty over the prompt and the answer (as `generate` has it); OpenAI's
        presence and frequency penalties over the answer's tokens only (as vLLM has them)."""
        params = self._params
        answer_ids = torch.tensor(answer, dtype=torch.long)
        if params.repetition_penalty != 1.0:
            seen = torch.unique(torch.cat([self._prompt, answer_ids])).to(scores.device)
            picked = scores[seen]
            scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
        if answer and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(answer_ids, minlength=scores.shape[-1])[: scores.shape[-1]]
            counts = counts.to(scores.device, scores.dtype)
            scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(scores.dtype)


def answer_logits(
    params: SamplingParams, prompt_ids: list[int], begun: list[int], grammars: Grammars
) -> AnswerLogits | None:
    """The answer's own processing, or None when it asks for none (most requests: nothing to run)."""
    if not (
        params.logprobs is not None or params.constrained or params.repetition_penalty != 1.0
        or params.presence_penalty or params.frequency_penalty or params.logit_bias
    ):
        return None
    return AnswerLogits(params, prompt_ids, begun, grammars.vocab_size, grammars.of(params))

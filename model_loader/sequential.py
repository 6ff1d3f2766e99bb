"""One generation at a time with `model.generate`, streaming through a per-step stopping criterion.

transformers calls a stopping criterion after every new token, on the decoding thread: that is
where the `TokenSink` takes the token, so streaming needs no second thread competing with the
model for the cores (a `TextIteratorStreamer` thread ran at 0.6x of plain `generate` here).
"""

import threading

import llguidance
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from model_loader.contract import (
    Capabilities,
    FlushPolicy,
    Interruption,
    OnChunk,
    Outcome,
    Resume,
    SamplingParams,
    TokenLogprob,
    never,
)
from model_loader.grammar import GrammarMask, grammar_of, grammar_tokenizer
from model_loader.loader import LoadedModel, decoder, eos_ids, memory
from model_loader.sink import TokenSink


class _Logprobs(LogitsProcessor):
    """Keeps each step's log probabilities as the model gave them: it runs before any processor of ours
    (the grammar's mask) and before temperature, top-k and top-p, as llama.cpp's and vLLM's are."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def of(self, token_id: int) -> TokenLogprob:
        assert self.last is not None
        values, ids = torch.topk(self.last, self.top) if self.top else (self.last[:0], self.last[:0])
        return TokenLogprob(float(self.last[token_id]), [(int(i), float(v)) for i, v in zip(ids, values)])


class _Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the answer's tokens so far (not the prompt's, as in
    vLLM), and logit_bias added to the ids it names."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, vocab_size: int) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.prompt_tokens = prompt_tokens
        self.bias = torch.zeros(vocab_size)
        for token_id, bias in params.logit_bias:
            self.bias[token_id] = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[0, self.prompt_tokens :]
        if len(answer) and (self.presence or self.frequency):
            counts = torch.bincount(answer, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            scores[0] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        scores[0, : len(self.bias)] += self.bias.to(scores.device, scores.dtype)[: scores.shape[-1]]
        return scores


class _SinkCriterion(StoppingCriteria):
    def __init__(self, sink: TokenSink, logprobs: _Logprobs | None) -> None:
        self.sink = sink
        self.logprobs = logprobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        token = int(input_ids[0, -1])
        done = self.sink.add(token, self.logprobs.of(token) if self.logprobs else None)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class SequentialEngine:
    """Owns the model; `generate` may be called from any thread and runs one at a time."""

    def __init__(self, loaded: LoadedModel, flush: FlushPolicy, context_tokens: int) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.flush = flush
        self.capabilities = Capabilities(
            engine="transformers", slots=1, context_tokens=context_tokens, seed=True, repetition_penalty=True,
            grammar=True, logprobs=True, penalties=True,
        )
        self._lock = threading.Lock()
        self._eos_ids = eos_ids(loaded)
        self._decode = decoder(loaded)
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None  # built at the first constrained request

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: OnChunk,
        interruption: Interruption = never,
        resume: Resume = Resume(),
    ) -> Outcome:
        with self._lock, torch.inference_mode():
            try:
                return self._generate(input_ids, params, on_chunk, interruption, resume)
            except torch.OutOfMemoryError as exc:  # the contract's out-of-memory, which the worker answers
                raise MemoryError(str(exc)) from exc

    @property
    def ready(self) -> bool:
        """`generate` runs on the caller's thread: nothing in the background can die."""
        return True

    def close(self) -> None:
        """Nothing runs in the background."""

    def _generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: OnChunk,
        interruption: Interruption,
        resume: Resume,
    ) -> Outcome:
        device = self.loaded.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sink = TokenSink.opened(self._decode, params, on_chunk, interruption, self.flush, resume)
        logprobs = None if params.logprobs is None else _Logprobs(params.logprobs)
        if left := sink.tokens_left(params, self._eos_ids):
            ids = torch.tensor([input_ids + resume.token_ids], device=device)
            self.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                stopping_criteria=StoppingCriteriaList([_SinkCriterion(sink, logprobs)]),
                logits_processor=LogitsProcessorList([
                    *([logprobs] if logprobs else []), *self._penalties(params, len(input_ids)),
                    *self._grammar_mask(params, resume),
                ]),
                pad_token_id=self.loaded.tokenizer.pad_token_id or self._eos_ids[0],
                eos_token_id=self._eos_ids,
                **_sampling_kwargs(params, left),
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        sink.close()
        return sink.outcome(len(input_ids), self._eos_ids, memory(self.loaded))


    def _penalties(self, params: SamplingParams, prompt_tokens: int) -> list[LogitsProcessor]:
        if not (params.presence_penalty or params.frequency_penalty or params.logit_bias):
            return []
        return [_Penalties(params, prompt_tokens, self.loaded.model.config.get_text_config().vocab_size)]

    def _grammar_mask(self, params: SamplingParams, resume: Resume) -> LogitsProcessorList:
        if not params.constrained:
            return LogitsProcessorList()
        if self._grammar_tokenizer is None:
            vocab = self.loaded.model.config.get_text_config().vocab_size
            self._grammar_tokenizer = grammar_tokenizer(self.loaded.tokenizer, vocab, self._eos_ids)
        return LogitsProcessorList([GrammarMask(self._grammar_tokenizer, grammar_of(params), resume.token_ids)])


def _sampling_kwargs(params: SamplingParams, max_new_tokens: int) -> dict[str, object]:
    """`generate`'s arguments; temperature 0 means greedy, top_k 0 means no top-k."""
    common = {"max_new_tokens": max_new_tokens, "repetition_penalty": params.repetition_penalty}
    if params.temperature == 0:
        return common | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return common | {
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or None,
    }

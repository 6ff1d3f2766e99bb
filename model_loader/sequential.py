"""One generation at a time with `model.generate`, streaming through a per-step stopping criterion.

transformers calls a stopping criterion after every new token, on the decoding thread: that is
where the `TokenSink` takes the token, so streaming needs no second thread competing with the
model for the cores (a `TextIteratorStreamer` thread ran at 0.6x of plain `generate` here).
"""

import threading

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
    never,
)
from model_loader.grammar import Grammars
from model_loader.logits import AnswerLogits, answer_logits
from model_loader.loader import LoadedModel, decoder, eos_ids, memory
from model_loader.sink import TokenSink


class _Answer(LogitsProcessor):
    """The answer's own processing as `generate` runs it: a batch of one, whose answer follows `start`."""

    def __init__(self, answer: AnswerLogits, start: int) -> None:
        self.answer = answer
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.answer.step(input_ids[0, self.start :].tolist(), scores[0])
        return scores


class _SinkCriterion(StoppingCriteria):
    def __init__(self, sink: TokenSink, answer: AnswerLogits | None) -> None:
        self.sink = sink
        self.answer = answer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        token = int(input_ids[0, -1])
        done = self.sink.add(token, self.answer.logprob(token) if self.answer else None)
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
        self._grammars = Grammars(loaded.tokenizer, loaded.model.config.get_text_config().vocab_size, self._eos_ids)

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
        answer = answer_logits(params, input_ids, resume.token_ids, self._grammars)
        if left := sink.tokens_left(params, self._eos_ids):
            ids = torch.tensor([input_ids + resume.token_ids], device=device)
            self.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                stopping_criteria=StoppingCriteriaList([_SinkCriterion(sink, answer)]),
                logits_processor=LogitsProcessorList([_Answer(answer, ids.shape[1])] if answer else []),
                pad_token_id=self.loaded.tokenizer.pad_token_id or self._eos_ids[0],
                eos_token_id=self._eos_ids,
                **_sampling_kwargs(params, left),
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        sink.close()
        return sink.outcome(len(input_ids), self._eos_ids, memory(self.loaded))


def _sampling_kwargs(params: SamplingParams, max_new_tokens: int) -> dict[str, object]:
    """`generate`'s arguments; temperature 0 means greedy, top_k 0 means no top-k. The repetition penalty is
    the answer's own processing (model_loader.logits), so none of the model's defaults adds another."""
    common = {"max_new_tokens": max_new_tokens, "repetition_penalty": 1.0}
    if params.temperature == 0:
        return common | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return common | {
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or None,
    }

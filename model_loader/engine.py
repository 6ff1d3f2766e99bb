"""The generation engine: one loaded model, streaming token chunks to a callback as it decodes.

Streaming is a callback kept out of the decoding loop: a stopping criterion that transformers
calls after every token takes the new id, feeds the text stream and, every few tokens or
milliseconds, hands the publishable text to `on_chunk`. It runs on the decoding thread, so
unlike a streamer thread it does not compete with the model for the cores. The same hook
checks `should_stop` every step, which is how cancellation and deadlines reach the model.
"""

import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from model_loader.loader import LoadedModel
from model_loader.streaming import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class FlushPolicy:
    every_tokens: int = 4
    every_s: float = 0.1


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    generation_s: float
    peak_bytes: int


@dataclass
class _StepHook(StoppingCriteria):
    """Called by `generate` after each new token; returns True to end generation."""

    stream: TextStream
    on_chunk: Callable[[str], None]
    should_stop: Callable[[], bool]
    flush: FlushPolicy
    started: float
    first_token_at: float | None = None
    tokens: int = 0
    interrupted: bool = False
    _unflushed: int = 0
    _last_flush: float = field(default_factory=time.perf_counter)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.tokens += 1
        self.stream.add(int(input_ids[0, -1]))
        self._unflushed += 1
        if self._unflushed >= self.flush.every_tokens or now - self._last_flush >= self.flush.every_s:
            self.publish(self.stream.take_publishable())
        self.interrupted = self.should_stop()
        done = self.stream.stopped or self.interrupted
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def publish(self, chunk: str) -> None:
        self._unflushed = 0
        self._last_flush = time.perf_counter()
        if chunk:
            self.on_chunk(chunk)


class Engine:
    """Owns the model; `generate` may be called from any thread, one generation at a time."""

    def __init__(self, loaded: LoadedModel, flush: FlushPolicy) -> None:
        self.loaded = loaded
        self.flush = flush
        self._lock = threading.Lock()
        self._eos_ids = _eos_ids(loaded)

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Outcome:
        with self._lock, torch.inference_mode():
            return self._generate(input_ids, params, on_chunk, should_stop)

    def _generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> Outcome:
        device = self.loaded.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stream = TextStream(self._decode, params.stop)
        started = time.perf_counter()
        hook = _StepHook(stream, on_chunk, should_stop, self.flush, started)
        ids = torch.tensor([input_ids], device=device)
        output = self.loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            stopping_criteria=StoppingCriteriaList([hook]),
            pad_token_id=self.loaded.tokenizer.pad_token_id or self._eos_ids[0],
            eos_token_id=self._eos_ids,
            **_sampling_kwargs(params),
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        generation_s = time.perf_counter() - started
        hook.publish(stream.take_rest())
        new_ids = output[0, len(input_ids) :].tolist()
        return Outcome(
            text=stream.text,
            finish_reason=_finish_reason(stream, new_ids, self._eos_ids, params),
            prompt_tokens=len(input_ids),
            completion_tokens=len(new_ids),
            time_to_first_token_s=None if hook.first_token_at is None else hook.first_token_at - started,
            generation_s=generation_s,
            peak_bytes=_peak_bytes(device),
        )

    def _decode(self, ids: list[int]) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=True)


def _sampling_kwargs(params: SamplingParams) -> dict[str, object]:
    if params.temperature == 0:
        return {"max_new_tokens": params.max_new_tokens, "do_sample": False,
                "repetition_penalty": params.repetition_penalty, "temperature": None, "top_p": None, "top_k": None}
    return {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or None,
        "repetition_penalty": params.repetition_penalty,
    }


def _finish_reason(stream: TextStream, new_ids: list[int], eos_ids: list[int], params: SamplingParams) -> str:
    if stream.stopped:
        return "stop"
    if new_ids and new_ids[-1] in eos_ids:
        return "eos"
    return "length"


def _eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _peak_bytes(device: torch.device) -> int:
    """CUDA peak allocated since the task began on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

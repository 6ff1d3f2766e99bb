"""The generation engine's contract and the parts both engines share.

A task hands the engine prompt ids, sampling parameters, an `on_chunk` callback (text and the
token ids it came from) and an `interruption` check (why generation must end now, if it must:
"cancelled", "timeout", or "superseded" and "handed_back", after which another attempt goes on);
it gets back an `Outcome`. A `Resume` takes up an answer an earlier attempt began: its tokens
follow the prompt, and generation goes on after them. `SequentialEngine` runs one generation at
a time with `model.generate`; `BatchingEngine` batches the decoding steps of concurrent tasks on
the same model. Both feed tokens through a `TokenSink`, so streaming, stop strings and cancellation
behave the same in either.
"""

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from core.protocol import HANDED_BACK, SUPERSEDED
from core.settings import Settings
from model_loader.loader import LoadedModel
from model_loader.streaming import TextStream


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
    stop_string: str | None = None


Interruption = Callable[[], str | None]
OnChunk = Callable[[str, list[int]], object]


@dataclass(frozen=True)
class Resume:
    """An answer earlier attempts began: the token ids they published and the text of those chunks."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""


class EngineRestarted(RuntimeError):
    """The engine failed under this generation through no fault of its own and has started afresh.

    The task should run again (the worker hands it back to the queue) rather than fail.
    """


class EngineBroken(RuntimeError):
    """The engine failed and could not start again: this process can generate nothing more.

    The task should run again elsewhere, and the process end so that it is started afresh.
    """


def never() -> str | None:
    return None


class Engine(Protocol):
    loaded: LoadedModel

    @property
    def ready(self) -> bool:
        """Whether it can take a generation now (False while it recovers from a failure)."""
        ...

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: OnChunk,
        interruption: Interruption = ...,
        resume: Resume = ...,
    ) -> Outcome: ...

    def close(self) -> None: ...


@dataclass
class TokenSink:
    """Takes each new token on the decoding side: decodes, publishes in batches, decides whether to stop.

    Publishing every few tokens or milliseconds (not every token, and not from another thread)
    keeps streaming from slowing decoding down; the first token is published at once, since the
    time to the first text is what a reader waits on most. Each chunk carries the ids of the
    tokens added since the one before, so that another attempt can take the answer up from them.
    """

    stream: TextStream
    on_chunk: OnChunk
    interruption: Interruption
    flush: FlushPolicy
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    tokens: int = 0
    last_token: int | None = None
    interrupted: str | None = None
    _unpublished_ids: list[int] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.perf_counter)

    def resume(self, resume: Resume) -> None:
        """Start where earlier attempts stopped: their tokens count towards the answer's."""
        self.stream.resume(resume.token_ids, resume.text)
        self.tokens = len(resume.token_ids)
        self.last_token = resume.token_ids[-1] if resume.token_ids else None

    def tokens_left(self, params: SamplingParams, eos: list[int]) -> int:
        """How many more tokens to generate: none once a resumed answer has already ended."""
        if self.stream.stopped or self.last_token in eos:
            return 0
        return max(0, params.max_new_tokens - self.tokens)

    def add(self, token_id: int) -> bool:
        """Returns True when generation should end here: a stop string appeared, or an interruption."""
        now = time.perf_counter()
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        self.tokens += 1
        self.last_token = token_id
        self.stream.add(token_id)
        self._unpublished_ids.append(token_id)
        due = len(self._unpublished_ids) >= self.flush.every_tokens or now - self._last_flush >= self.flush.every_s
        if first or due:
            self._publish(self.stream.take_publishable())
        return self.stream.stopped or self.poll_interruption()

    def poll_interruption(self) -> bool:
        self.interrupted = self.interrupted or self.interruption()
        return self.interrupted is not None

    def close(self) -> None:
        """Generation ended: everything held back is final now, unless another attempt goes on
        with the answer (which may yet cut held-back text at a stop string)."""
        if self.interrupted in (SUPERSEDED, HANDED_BACK):
            self._publish(self.stream.take_publishable())
        else:
            self._publish(self.stream.take_rest())

    def outcome(self, prompt_tokens: int, eos_ids: list[int], device: torch.device) -> Outcome:
        return Outcome(
            text=self.stream.text,
            finish_reason=self._finish_reason(eos_ids),
            prompt_tokens=prompt_tokens,
            completion_tokens=self.tokens,
            time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
            generation_s=time.perf_counter() - self.started,
            peak_bytes=peak_bytes(device),
            stop_string=self.stream.stopped_by,
        )

    def _finish_reason(self, eos_ids: list[int]) -> str:
        if self.stream.stopped:
            return "stop"
        if self.interrupted:
            return self.interrupted
        if self.last_token is not None and self.last_token in eos_ids:
            return "eos"
        return "length"

    def _publish(self, chunk: str) -> None:
        self._last_flush = time.perf_counter()
        if chunk:
            self.on_chunk(chunk, self._unpublished_ids)
            self._unpublished_ids = []


def eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def decoder(loaded: LoadedModel) -> Callable[[list[int]], str]:
    return lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)


def peak_bytes(device: torch.device) -> int:
    """CUDA peak allocated since the last reset on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_engine(loaded: LoadedModel, settings: Settings) -> Engine:
    """One generation at a time at a concurrency of 1; batched decoding above it."""
    flush = FlushPolicy(every_tokens=settings.stream_flush_tokens, every_s=settings.stream_flush_ms / 1000)
    if settings.worker_concurrency == 1:
        from model_loader.sequential import SequentialEngine

        return SequentialEngine(loaded, flush)
    from model_loader.batching import BatchingEngine

    return BatchingEngine(loaded, flush, settings)

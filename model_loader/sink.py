"""The one place every engine's tokens go: decoding, publishing in batches, deciding when to stop."""

import time
from dataclasses import dataclass, field

from core.protocol import HANDED_BACK, SUPERSEDED
from model_loader.contract import (
    EngineMemory,
    FlushPolicy,
    Interruption,
    OnChunk,
    Outcome,
    Resume,
    SamplingParams,
    TokenLogprob,
)
from model_loader.streaming import Decode, TextStream


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
    logprobs: bool = False  # the request asked for log probabilities: one (or None) is kept per token
    _unpublished_ids: list[int] = field(default_factory=list)
    _unpublished_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.perf_counter)

    @classmethod
    def opened(
        cls, decode: Decode, params: SamplingParams, on_chunk: OnChunk, interruption: Interruption,
        flush: FlushPolicy, resume: Resume,
    ) -> "TokenSink":
        """The sink for one answer, as every engine opens it: its stop strings, whether it keeps log
        probabilities, and the tokens earlier attempts published."""
        sink = cls(TextStream(decode, params.stop), on_chunk, interruption, flush, logprobs=params.logprobs is not None)
        sink.resume(resume)
        return sink

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

    def add(self, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """Returns True when generation should end here: a stop string appeared, or an interruption.
        `logprob` comes with every token of an answer that asked for them."""
        now = time.perf_counter()
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        self.tokens += 1
        self.last_token = token_id
        self.stream.add(token_id)
        self._unpublished_ids.append(token_id)
        if self.logprobs:
            self._unpublished_logprobs.append(logprob)
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
            self._publish(self.stream.take_rest(), final=True)

    def outcome(self, prompt_tokens: int, eos_ids: list[int], memory: EngineMemory) -> Outcome:
        return Outcome(
            text=self.stream.text,
            finish_reason=self._finish_reason(eos_ids),
            prompt_tokens=prompt_tokens,
            completion_tokens=self.tokens,
            time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
            generation_s=time.perf_counter() - self.started,
            memory=memory,
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

    def _publish(self, chunk: str, final: bool = False) -> None:
        """A chunk with no text waits for the next, except the last: its ids (an end-of-sequence
        token decodes to nothing) still belong to the answer a takeover would resume."""
        self._last_flush = time.perf_counter()
        if chunk or (final and self._unpublished_ids):
            self.on_chunk(chunk, self._unpublished_ids, self._unpublished_logprobs)
            self._unpublished_ids = []
            self._unpublished_logprobs = []

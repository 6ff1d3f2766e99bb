"""The worker's side of an engine that runs as a server of its own (llama.cpp's, vLLM's).

Both take a prompt as token ids and stream the answer's ids back; the worker decodes them through
the same `TokenSink` as every engine, which owns stop strings, hold-back and interruptions. Each
server engine says only how it streams one answer (`_stream`), decodes ids and tells its memory.
Both stream Server-Sent Events, read with httpx-sse, whose lines end only at CR or LF as SSE's
do: httpx's own `iter_lines` also ends one at U+2028, U+0085 and the like, which a server's JSON
carries unescaped whenever the model writes one, and would cut an event in two.
"""

from abc import ABC, abstractmethod

import httpx

from model_loader.contract import EngineMemory, FlushPolicy, Interruption, OnChunk, Outcome, Resume, SamplingParams, never
from model_loader.engine_server import EngineServer
from model_loader.sink import TokenSink


class ServedEngine(ABC):
    server: EngineServer
    flush: FlushPolicy
    _client: httpx.Client
    _eos_ids: list[int]

    @property
    def ready(self) -> bool:
        return self.server.alive

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: OnChunk,
        interruption: Interruption = never,
        resume: Resume = Resume(),
    ) -> Outcome:
        """Going on from published tokens is one more prompt: the prompt's ids and those tokens (each
        engine says how a grammar goes on from them)."""
        sink = TokenSink.opened(self._decode, params, on_chunk, interruption, self.flush, resume)
        if left := sink.tokens_left(params, self._eos_ids):
            self._stream(input_ids, resume.token_ids, params, left, sink)
        sink.close()
        return sink.outcome(len(input_ids), self._eos_ids, self._memory())

    def close(self) -> None:
        self._client.close()
        self.server.stop()

    @abstractmethod
    def _stream(
        self, prompt: list[int], answer: list[int], params: SamplingParams, max_new_tokens: int, sink: TokenSink
    ) -> None:
        """Stream the ids that follow `prompt` and the `answer` begun so far from the server into `sink`,
        until the answer ends or the sink says stop."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _memory(self) -> EngineMemory: ...

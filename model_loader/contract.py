"""The generation engine's contract, free of torch: what a worker hands an engine and gets back.

A task hands the engine prompt ids, sampling parameters, an `on_chunk` callback (text and the
token ids it came from) and an `interruption` check (why generation must end now, if it must:
"cancelled", "timeout", or "superseded" and "handed_back", after which another attempt goes on);
it gets back an `Outcome`. A `Resume` takes up an answer an earlier attempt began: its tokens
follow the prompt, and generation goes on after them.

Engines (`model_loader.factory` picks one): llama.cpp's `llama-server` and vLLM's server, each
run by the worker as a child process it supervises, and transformers in this process, one
generation at a time or batched. Each says what it can do in `Capabilities`, which the worker's
heartbeat reports, so the API refuses what the live workers cannot do. Every engine feeds its
tokens through one `TokenSink`, so streaming, stop strings and cancellation behave the same.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol

from core.protocol import SamplingParams

__all__ = ["SamplingParams"]  # made by the request itself (GenerateRequest.to_sampling_params), used by engines


@dataclass(frozen=True)
class FlushPolicy:
    every_tokens: int = 4
    every_s: float = 0.1


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, reported in its worker's heartbeat and checked by the API."""

    engine: str
    slots: int  # generations it runs at once
    context_tokens: int  # most tokens (prompt and answer) one generation may hold
    seed: bool  # a seed per request, reproducible whatever else runs beside it
    repetition_penalty: bool
    grammar: bool  # decoding constrained by a JSON schema or a GBNF grammar, resumable after a takeover
    logprobs: bool  # each token's log probability and its likeliest alternatives
    penalties: bool  # presence and frequency penalties, and logit_bias

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class EngineMemory:
    """What is true for the engine's memory now; None where this engine cannot tell.

    `weight_bytes` is what the weights take as loaded (a GGUF file is mapped as it is);
    `process_rss_bytes` is the resident memory of the process that generates (the engine server
    for a server engine, this worker for an in-process one); `peak_bytes` is CUDA's peak
    allocation during the task on GPU, else the generating process's peak or current RSS.
    """

    device: str
    weight_bytes: int
    peak_bytes: int
    process_rss_bytes: int | None = None
    kv_cache_tokens_used: int | None = None
    kv_cache_tokens: int | None = None
    gpu_bytes: int | None = None


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    generation_s: float
    memory: EngineMemory
    stop_string: str | None = None


class TokenLogprob(NamedTuple):
    """A generated token's log probability under the model, and the likeliest ids with theirs (as many as
    asked for), as JSON `[logprob, [[id, logprob], ...]]`."""

    logprob: float
    top: list[tuple[int, float]]


Interruption = Callable[[], str | None]
# A chunk's text, the ids of its tokens and, when asked for, each token's log probabilities (else empty).
OnChunk = Callable[[str, list[int], list[TokenLogprob | None]], object]


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
    name: str  # the model's name, as results report it
    capabilities: Capabilities

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

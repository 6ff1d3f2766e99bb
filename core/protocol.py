"""Every wire shape, defined once: what clients send, what the worker stores, what pollers read.

Limits that do not depend on settings live in the types; the configured ones (max_new_tokens,
context window) are checked by the API against the settings.
"""

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.constraints import gbnf_error, schema_error
from core.settings import Settings


class Role(StrEnum):
    system = "system"
    user = "user"
    assistant = "assistant"


# Logits are divided by these: much smaller values overflow float32 and the sampler fails.
MIN_TEMPERATURE = 1e-3
MIN_REPETITION_PENALTY = 1e-3
# Stop strings are searched for after every token: their sizes bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_STOP_TOTAL_CHARS = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_LOGIT_BIAS = 300  # OpenAI's bound on logit_bias entries
MAX_PROMPT_IDS = 1_000_000  # a bound on the body's work; the context window is the real limit


def _encodable(text: str) -> str:
    """JSON can carry a lone surrogate as a \\u escape, but it is not text: UTF-8 and tokenizers refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode at character {exc.start}: a lone surrogate") from None
    return text


def _greedy_or_warm(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return temperature


Text = Annotated[str, AfterValidator(_encodable)]


class ChatMessage(BaseModel):
    role: Role
    content: Text = Field(min_length=1)


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]


class GenerateRequest(BaseModel):
    """A prompt or a conversation, and how to sample the answer (None means the server default).

    Every check names the field at fault (`loc`), so each rule sits in that field's validator;
    fields are validated in the order written, which is why `system_prompt` comes before
    `messages`, whose checks need it.
    """

    # Infinity and NaN (JSON parsers here accept them) would reach the engine: sampling at an infinite
    # temperature or penalty is NaN, and llama-server's JSON has no way to say them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text | None = Field(None, min_length=1)
    prompt_ids: list[int] | None = Field(
        None, min_length=1, max_length=MAX_PROMPT_IDS, description="The model's input as token ids (no chat format)."
    )
    system_prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    raw: bool = Field(
        False, description="The prompt is the model's input as it is: no chat format and no system prompt."
    )
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: Annotated[float, AfterValidator(_greedy_or_warm)] | None = Field(
        None, ge=0, description="0 means greedy decoding."
    )
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 disables top-k; above the vocabulary it is the vocabulary.")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    presence_penalty: float = Field(0, ge=-2, le=2, description="Subtracted from a token's logit once it has appeared.")
    frequency_penalty: float = Field(0, ge=-2, le=2, description="Subtracted once per time a token has appeared.")
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS, description="Added to these token ids' logits."
    )
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    json_schema: dict[str, Any] | None = Field(
        None, description="The answer is JSON valid against this schema ({} is any JSON object), by constrained decoding."
    )
    grammar: str | None = Field(None, min_length=1, description="The answer matches this GBNF grammar (llama.cpp's).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="Each token's log probability and this many likeliest alternatives (0 to 20); off when left out.",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str | None) -> str | None:
        if prompt is not None and not prompt.strip():
            raise ValueError("'prompt' is blank")
        return prompt

    @field_validator("messages")
    @classmethod
    def _one_source(cls, messages: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if "prompt" not in info.data or "prompt_ids" not in info.data:  # refused already; that error says enough
            return messages
        if [info.data["prompt"], info.data["prompt_ids"], messages].count(None) != 2:
            raise ValueError("give exactly one of 'prompt', 'prompt_ids' or 'messages'")
        if messages is not None:
            _check_roles(messages, has_system_prompt=info.data.get("system_prompt") is not None)
        return messages

    @field_validator("raw")
    @classmethod
    def _raw_prompt_only(cls, raw: bool, info: ValidationInfo) -> bool:
        if raw and (info.data.get("messages") is not None or info.data.get("system_prompt") is not None):
            raise ValueError("'raw' takes a 'prompt' alone: no 'messages' and no 'system_prompt'")
        return raw

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: list[str]) -> list[str]:
        total = sum(len(s) for s in stop)
        if total > MAX_STOP_TOTAL_CHARS:
            raise ValueError(
                f"'stop' strings hold {total} characters together, above the limit of {MAX_STOP_TOTAL_CHARS}"
            )
        return stop

    @field_validator("json_schema")
    @classmethod
    def _compiles(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and (error := schema_error(schema)):
            raise ValueError(f"the schema cannot constrain an answer: {error}")
        return schema

    @field_validator("grammar")
    @classmethod
    def _parses(cls, grammar: str | None, info: ValidationInfo) -> str | None:
        if grammar is not None and info.data.get("json_schema") is not None:
            raise ValueError("give at most one of 'json_schema' or 'grammar'")
        if grammar is not None and (error := gbnf_error(grammar)):
            raise ValueError(f"the grammar cannot constrain an answer: {error}")
        return grammar

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.grammar is not None

    @property
    def prefilled(self) -> bool:
        """The messages end with the assistant's answer begun: the model goes on with it."""
        return bool(self.messages) and self.messages[-1].role == Role.assistant  # type: ignore[index]

    def conversation(self) -> list[ChatMessage]:
        """The request as messages, whichever way it was given (none for token ids)."""
        if self.messages is not None:
            return self.messages
        return [] if self.prompt is None else [ChatMessage(role=Role.user, content=self.prompt)]

    def with_defaults(self, settings: Settings) -> "GenerateRequest":
        """The request as a worker will run it: each sampling choice left out takes these settings'
        default. The API sends this in the task's payload, so what runs does not depend on the
        worker's own settings, and a family's echo of the request shows what ran."""
        defaults = sampling_defaults(settings)
        return self.model_copy(update={name: value for name, value in defaults.items() if getattr(self, name) is None})

    def to_sampling_params(self, settings: Settings) -> "SamplingParams":
        """The engine's parameters, converted once; `settings` fill in only what a payload lacks
        (one sent by an API of an earlier version, or by hand)."""
        full = self.with_defaults(settings)
        return SamplingParams(
            max_new_tokens=full.max_new_tokens,  # type: ignore[arg-type]
            temperature=full.temperature,  # type: ignore[arg-type]
            top_p=full.top_p,  # type: ignore[arg-type]
            top_k=full.top_k,  # type: ignore[arg-type]
            repetition_penalty=full.repetition_penalty,  # type: ignore[arg-type]
            presence_penalty=full.presence_penalty,
            frequency_penalty=full.frequency_penalty,
            logit_bias=tuple(full.logit_bias.items()),
            seed=full.seed,
            stop=tuple(full.stop),
            json_schema=None if full.json_schema is None else json.dumps(full.json_schema),
            grammar=full.grammar,
            logprobs=full.logprobs,
        )


@dataclass(frozen=True)
class SamplingParams:
    """What an engine is asked to do for one answer, every default resolved."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float = 0.0  # OpenAI's: over the answer's tokens so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # token id, added to its logit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: str | None = None  # the schema as JSON text (hashable, and what a server is sent)
    grammar: str | None = None  # GBNF
    logprobs: int | None = None  # each token's log probability and this many alternatives; None: off

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.grammar is not None


def sampling_defaults(settings: Settings) -> dict[str, float | int]:
    """The server's sampling defaults, by GenerateRequest's field names: the one place they are read."""
    return {
        "max_new_tokens": settings.default_max_new_tokens,
        "temperature": settings.default_temperature,
        "top_p": settings.default_top_p,
        "top_k": settings.default_top_k,
        "repetition_penalty": settings.default_repetition_penalty,
    }


def _check_roles(messages: list[ChatMessage], has_system_prompt: bool) -> None:
    """An optional system message first, then user and assistant turns alternating, ending with the user, or
    with the assistant's answer begun, which the model goes on with (a prefill, as llama.cpp's and
    Anthropic's APIs take it)."""
    turns = messages
    if turns[0].role == Role.system:
        if has_system_prompt:
            raise ValueError("'messages' has a system message and 'system_prompt' is set: give only one")
        turns = turns[1:]
    if not turns:
        raise ValueError("'messages' must contain a user message after the system message")
    for i, message in enumerate(turns):
        expected = Role.user if i % 2 == 0 else Role.assistant
        if message.role != expected:
            raise ValueError(
                f"'messages' roles must alternate user/assistant after an optional system message: "
                f"turn {i + 1} is '{message.role}', expected '{expected}'"
            )


class GenerateAccepted(BaseModel):
    task_id: str
    status_url: str


class TaskStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (TaskStatus.queued, TaskStatus.running)


FinishReason = Literal["eos", "length", "stop", "cancelled", "timeout"]

# Why an attempt stops without ending its task: another attempt holds the task now (`superseded`),
# or its worker is stopping and gives the task back (`handed_back`). Either way the next attempt
# goes on from the chunks published so far.
SUPERSEDED = "superseded"
HANDED_BACK = "handed_back"


class Chunk(BaseModel):
    cursor: str = Field(description="Pass as ?after= to get only later chunks.")
    text: str
    logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = Field(
        None, description="With `logprobs` asked for: each token's id, log probability and likeliest alternatives."
    )


class StreamedChunk(BaseModel):
    """A chunk as `GET /task/{id}/events` pushes it; the event's id is its cursor."""

    text: str
    attempt: int = Field(description="The attempt that wrote it: a higher one took over and goes on with the answer.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    queued_s: float
    time_to_first_token_s: float | None
    generation_s: float
    tokens_per_second: float
    total_s: float


class MemoryStats(BaseModel):
    """What the engine could tell of its memory; a figure it cannot tell is left out, never guessed."""

    device: str
    engine: str | None = Field(None, description="llamacpp, vllm or transformers.")
    model_weight_bytes: int
    peak_bytes: int = Field(
        description="CUDA peak allocated during the task on GPU; else the generating process's peak (in-process "
        "engines) or current (engine servers) resident memory."
    )
    process_rss_bytes: int | None = Field(None, description="Resident memory of the process that generates.")
    kv_cache_tokens_used: int | None = Field(None, description="KV cache cells in use when the task ended.")
    kv_cache_tokens: int | None = Field(None, description="KV cache cells reserved.")
    gpu_bytes: int | None = Field(None, description="GPU memory the engine holds.")


class GenerationResult(BaseModel):
    """What a worker stores when a task ends with text: succeeded, or cancelled with its partial text."""

    text: str
    finish_reason: FinishReason
    stop_string: str | None = Field(None, description="The stop string that ended it (finish_reason 'stop').")
    usage: Usage
    timings: Timings
    memory: MemoryStats
    model: str
    worker: str


class TaskView(BaseModel):
    """What `GET /task/{id}` answers: progress always, the result fields once finished."""

    task_id: str
    status: TaskStatus
    attempt: int = Field(
        0, description="1 for the first run; higher when a worker died or stopped and another went on with the answer."
    )
    text: str | None = Field(
        description="All text generated so far; null on a poll with `after`, which gets only the chunks since its "
        "cursor (poll once without it for the whole text)."
    )
    chunks: list[Chunk] = Field(description="Chunks after the requested cursor (all without one), oldest first.")
    cursor: str = Field(description="The cursor to pass as ?after= next time.")
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    memory: MemoryStats | None = None
    model: str | None = None
    worker: str | None = None
    error: str | None = None
    message: str | None = Field(
        None, description="'Task not completed yet' until the task ends (what simple pollers wait to disappear)."
    )
    queue_position: int | None = Field(
        None, description="While queued: how many tasks will start before this one (0: it is next)."
    )
    estimated_start_s: float | None = Field(
        None, description="While queued: about how many seconds until it starts, from recent task durations; "
        "null until the workers have finished a task."
    )


NOT_COMPLETED = "Task not completed yet"


class QueuePlace(BaseModel):
    """Where a queued task stands: what `GET /task/{id}` adds to its view, and the `queued` event's data."""

    queue_position: int
    estimated_start_s: float | None


class CancelAccepted(BaseModel):
    task_id: str
    status: TaskStatus = Field(description="'cancelled' for a task that had not started; 'running' while it stops.")


class ComponentHealth(BaseModel):
    ok: bool
    detail: str


class HealthReport(BaseModel):
    ok: bool
    api: ComponentHealth
    redis: ComponentHealth
    workers: ComponentHealth


class ErrorBody(BaseModel):
    detail: str

"""llama.cpp server's wire shapes (tools/server/README.md), for the routes served here.

Fields llama.cpp has and this server accepts without acting on them (`min_p`, `cache_prompt`,
the slot ids) are declared so that clients sending them work; unknown fields are ignored, as
llama.cpp ignores them.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.protocol import MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, TaskView, Text


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Text | list[int | Text | list[int | Text]] = Field(
        description="The model's raw input, as text (BOS as the tokenizer adds it) or token ids mixed with text; "
        "a list of such prompts (one holding no bare id) is a batch, answered as a list."
    )
    n_predict: int = Field(-1, ge=-1, description="-1 means the server's limit.")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1, description="Accepted, not applied.")
    stop: list[Text] = Field(default_factory=list)
    stream: bool = False
    seed: int = Field(-1, ge=-1, description="-1 means random.")
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    json_schema: dict[str, Any] | None = Field(None, description="The answer follows this schema; {} is any object.")
    grammar: str | None = Field(None, description="GBNF; wins over json_schema, as in llama.cpp. Empty is none.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: list[tuple[int | str, float | Literal[False]]] | dict[str, float | Literal[False]] | None = Field(
        None, description="[[id or text, bias], ...] or {id or text: bias}; text biases each of its tokens; "
        "false bans the token, as in llama.cpp.",
    )
    timings_per_token: bool = Field(False, description="Each streamed event carries the timings so far.")
    response_fields: list[str] = Field(
        default_factory=list, description="Answer only these fields ('a/b' for a nested one), as llama.cpp does."
    )
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token; 0: no probabilities.")
    cache_prompt: bool = True
    id_slot: int = -1
    slot_id: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_of_json_prompts(cls, prompt: Any) -> Any:
        """llama-server's JSON prompt, `{"prompt_string": ..., "multimodal_data": [...]}` (alone or in a batch),
        is its text: this server's models take no images or audio."""
        if isinstance(prompt, list):
            return [_json_prompt_text(part) for part in prompt]
        return _json_prompt_text(prompt)


class Timings(BaseModel):
    cache_n: int = 0  # prompt tokens taken from a cache: this server counts every prompt token as processed
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float

    @classmethod
    def so_far(cls, prompt_n: int, first_token_s: float, predicted_n: int, predicted_s: float) -> "Timings":
        """Mid-answer: the prompt until the first token, the prediction since it, as far as it has gone."""
        return cls(
            prompt_n=prompt_n,
            prompt_ms=first_token_s * 1000,
            prompt_per_token_ms=first_token_s * 1000 / prompt_n if prompt_n else 0.0,
            prompt_per_second=prompt_n / first_token_s if first_token_s else 0.0,
            predicted_n=predicted_n,
            predicted_ms=predicted_s * 1000,
            predicted_per_token_ms=predicted_s * 1000 / predicted_n if predicted_n else 0.0,
            predicted_per_second=predicted_n / predicted_s if predicted_s else 0.0,
        )

    @classmethod
    def of(cls, view: TaskView) -> "Timings":
        """llama.cpp's split: the prompt until the first token, the prediction after it."""
        prompt_n = view.usage.prompt_tokens if view.usage else 0
        predicted_n = view.usage.completion_tokens if view.usage else 0
        first_s = (view.timings.time_to_first_token_s or 0.0) if view.timings else 0.0
        predicted_s = max(0.0, (view.timings.generation_s if view.timings else 0.0) - first_s)
        return cls.so_far(prompt_n, first_s, predicted_n, predicted_s)


class TopProbability(BaseModel):
    id: int
    token: str
    bytes: list[int]
    logprob: float | None


class TokenProbability(TopProbability):
    """llama-server's `completion_probabilities` entry (with `post_sampling_probs` off: log probabilities)."""

    top_logprobs: list[TopProbability]


class CompletionResult(BaseModel):
    content: str
    stop: bool = True
    stop_type: Literal["eos", "limit", "word", "none"]
    stopped_eos: bool
    stopped_limit: bool
    stopped_word: bool
    stopping_word: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int = 0
    truncated: bool = False
    has_new_line: bool = False
    generation_settings: dict[str, Any]
    model: str
    prompt: str | list[int | str]  # as given
    index: int = 0  # which prompt of a batch
    id_slot: int = 0
    slot_id: int = 0
    timings: Timings
    completion_probabilities: list[TokenProbability] | None = None


class StreamPiece(BaseModel):
    index: int = 0  # which prompt of a batch
    content: str
    stop: Literal[False] = False
    timings: Timings | None = None
    completion_probabilities: list[TokenProbability] | None = None


class TokenizeRequest(BaseModel):
    content: Text
    add_special: bool = False
    with_pieces: bool = False


class Piece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[Piece]


class DetokenizeRequest(BaseModel):
    tokens: list[int] = Field(max_length=100_000)


class DetokenizeResponse(BaseModel):
    content: str


class TemplateMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ApplyTemplateRequest(BaseModel):
    messages: list[TemplateMessage] = Field(min_length=1)


class ApplyTemplateResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    code: int
    message: str
    type: str


def _json_prompt_text(prompt: Any) -> Any:
    if not isinstance(prompt, dict):
        return prompt
    if prompt.get("multimodal_data"):
        raise ValueError("multimodal_data: this server's model takes no images or audio")
    if not isinstance(prompt.get("prompt_string"), str):
        raise ValueError("a JSON prompt needs 'prompt_string', a string")
    return prompt["prompt_string"]


class ContextErrorDetail(ErrorDetail):
    """A prompt the context cannot hold, as llama-server reports one."""

    n_prompt_tokens: int
    n_ctx: int


class ErrorResponse(BaseModel):
    error: ErrorDetail

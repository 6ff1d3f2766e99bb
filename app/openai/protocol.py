"""OpenAI's wire shapes for the routes served here, as its API reference and official SDK define them.

Unknown fields are ignored, as vLLM does (clients send extras); fields that exist in OpenAI's API
but that this server cannot honour are declared, so that a request using them is refused by name
rather than silently served differently.
"""

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from app.llamacpp.protocol import Timings
from core.constraints import ANY_OBJECT
from core.protocol import MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, Text

MAX_CHOICES = 8  # n, and prompts in a batch times n: each is a task


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(None, description="A string, or a list of text parts.")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _complete(self) -> "Message":
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(BaseModel):
    include_usage: bool = False


class Unsupported(BaseModel):
    """OpenAI options this server does not implement: each refused with a 400 naming it when used."""

    functions: list[Any] | None = None
    function_call: Any = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    def first_used(self) -> str | None:
        neutral: dict[str, object] = {
            "best_of": 1, "echo": False,
            "functions": [],
        }
        return first_set(self, Unsupported, neutral)


def first_set(request: BaseModel, options: type[BaseModel], neutral: dict[str, object]) -> str | None:
    """The first of `options`' fields that `request` sets to something other than None or its
    neutral value (the value that asks for nothing this server lacks)."""
    for name in options.model_fields:
        value = getattr(request, name)
        if value is not None and value != neutral.get(name, object()):
            return name
    return None


class JsonSchema(BaseModel):
    """`response_format.json_schema`: the answer is constrained to the schema whether or not `strict` is set."""

    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="OpenAI's; optional here.")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="llama-server's: json_object's schema.")

    def schema_wanted(self) -> dict[str, Any] | None:
        """The schema the answer must follow; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return self.schema_ or ANY_OBJECT
        if self.json_schema is None or self.json_schema.schema_ is None:
            return ANY_OBJECT
        return self.json_schema.schema_


# OpenAI's tiers; "flex" runs as background work (core.queue), behind interactive work.
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class Sampling(Unsupported):
    """What Chat Completions and Completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model's name (or MODEL_ALIAS); left out, the served model.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate, each a task of its own.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    service_tier: ServiceTier | None = None
    # Extras that vLLM and others accept beyond OpenAI's own.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = Field(None, description="llama-server's extra: as response_format's schema.")
    grammar: str | None = Field(None, description="llama-server's extra: GBNF the answer follows.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Token ids (as strings) to -100..100.")

    @field_validator("response_format")
    @classmethod
    def _schema_given(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type == "json_schema" and value.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = Field(None, description="Default: auto with tools, none without.")
    parallel_tool_calls: bool = True
    # Messages ending with the assistant's answer begun go on with it (llama-server's prefill); vLLM's and
    # transformers' explicit names for that are accepted as they mean it.
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continue_an_answer(self) -> "ChatCompletionRequest":
        ends_with_answer = self.messages[-1].role == "assistant"
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.continue_final_message and not ends_with_answer:
            raise ValueError("continue_final_message needs messages that end with an assistant message")
        if ends_with_answer and self.add_generation_prompt:
            raise ValueError("messages that end with an assistant message go on with it: add_generation_prompt "
                             "cannot open another answer")
        return self

    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How the answer may call tools: not at all, as the model chooses, or it must (any, or the one named)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")


class CompletionRequest(Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="The model's raw input (no chat template): a string or token ids, or a batch of either."
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat's: one entry per token of the answer (or of the chunk, streamed)."""

    content: list[ContentLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """Completions' (the legacy shape): parallel lists, alternatives as {token: logprob}."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int


class Delta(BaseModel):
    """Only what a chunk adds: fields it leaves unset are left out, as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _set_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class UsageChunk(ChatCompletionChunk):
    """The usage chunk of a chat stream, with llama-server's `timings` beside OpenAI's usage, as
    llama-server sends them (prompt until the first token, prediction after it)."""

    timings: Timings


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class InputTokens(BaseModel):
    """How many tokens a request's prompt takes (OpenAI's Responses input-token count; llama-server's for chats)."""

    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

"""OpenAI's Responses API wire shapes, as its API reference and official SDK define them.

Text in, text out: the request's unknown fields are ignored, and the options that this server
cannot honour (tools, reasoning, chaining) are declared so that using one is
refused by name rather than silently served differently.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag

from app.openai.protocol import FunctionDefinition, ServiceTier, first_set
from core.constraints import ANY_OBJECT
from core.protocol import Text

# OpenAI's own bounds: what a record keeps for a day is bounded per request.
MAX_METADATA_KEYS = 16
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
MAX_USER_CHARS = 256


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: Text


class InputMessage(BaseModel):
    """One turn of `input`: an assistant's turn may quote its earlier output as `output_text` parts."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallInput(BaseModel):
    """A call the model made earlier, given back in `input` (as it appeared in `output`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutput(BaseModel):
    """A tool's result for one of those calls."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: Text


def _item_type(item: object) -> object:
    """A message may leave `type` out; the other items always say theirs."""
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition):
    """A function the model may call: Responses' tools are flat, where Chat nests them in `function`."""

    type: Literal["function"] = "function"


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON following `schema` (constrained whether or not
    `strict` is set); the schema's fields sit beside `type` here, where Chat nests them in `json_schema`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def schema_wanted(self) -> dict[str, Any] | None:
        """The schema the answer must follow; None for plain text."""
        if self.type == "text":
            return None
        return self.schema_ if self.type == "json_schema" and self.schema_ is not None else ANY_OBJECT


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat = Field(default_factory=TextFormat)


class Unsupported(BaseModel):
    """Responses options this server does not implement: each refused with a 400 naming it when used."""

    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    truncation: str | None = None

    def first_used(self) -> str | None:
        neutral: dict[str, object] = {"include": [], "truncation": "disabled"}
        return first_set(self, Unsupported, neutral)


class ResponseCreateRequest(Unsupported):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Text | list[InputItem] = Field(description="A user message as a string, or a list of turns and calls.")
    instructions: Text | None = Field(None, description="The system prompt.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA_KEYS)
    text: TextConfig | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128, description="Function tools only.")
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    service_tier: ServiceTier | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


ResponseStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]


class ResponseSettings(BaseModel):
    """What a response echoes of its request, kept with its task so that any API process can answer for it."""

    model: str
    created_at: int
    instructions: str | None
    max_output_tokens: int
    temperature: float
    top_p: float
    background: bool
    store: bool
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True


class Response(ResponseSettings):
    id: str
    object: Literal["response"] = "response"
    status: ResponseStatus
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    truncation: Literal["disabled"] = "disabled"


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class Event(BaseModel):
    """Every event of a response's stream: its `type` is also the SSE event name."""

    type: str
    sequence_number: int


class ResponseEvent(Event):
    """response.created, .queued, .in_progress, and the terminal .completed, .incomplete, .failed, .cancelled."""

    response: Response


class OutputItemEvent(Event):
    output_index: int = 0
    item: OutputItem


class ArgumentsDeltaEvent(Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ContentPartEvent(Event):
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: OutputText


class TextEvent(Event):
    item_id: str
    output_index: int = 0
    content_index: int = 0
    logprobs: list[Any] = Field(default_factory=list)


class TextDeltaEvent(TextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class TextDoneEvent(TextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ErrorEvent(Event):
    """The stream cannot go on (Redis unreachable too long, or the response expired): the response
    itself may still be retrieved."""

    type: Literal["error"] = "error"
    code: str
    message: str
    param: str | None = None


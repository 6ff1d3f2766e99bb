"""OpenAI requests onto the one internal request, and task results back into OpenAI's shapes."""

import hashlib
import time
from collections.abc import Callable

from tokenizers import Tokenizer

from app.openai.errors import OpenAIError
from app.openai.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    ContentLogprob,
    Delta,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    Sampling,
    ToolCall,
    TopLogprob,
    Usage,
)
from app.openai.tools import (
    ToolStream,
    call_id,
    call_turn,
    offered,
    parameters_error,
    read_answer,
    result_turn,
    tool_fields,
)
from app.streams import StreamEntry
from app.tokens import scored_token, spoken, token_text
from core.protocol import Role, TaskView
from core.settings import Settings
from model_loader.source import model_name
from prompts.tools import Call, Function

ROLES = {
    "system": Role.system, "developer": Role.system, "user": Role.user, "assistant": Role.assistant, "tool": Role.user,
}


def model_named(model: str | None, served: list[str], any_name: bool) -> str:
    """The model an answer names: the one asked for when served (any, with ANY_MODEL_NAME), the served
    model when none is named, as vLLM and llama-server do; else a 404."""
    if model is None:
        return served[0]
    if model not in served and not any_name:
        raise OpenAIError(
            404, f"the model '{model}' does not exist; this server serves {', '.join(served)}",
            param="model", code="model_not_found",
        )
    return model


def check_supported(body: Sampling) -> None:
    """Options this server cannot honour are refused by name."""
    refuse_unsupported(body.first_used())
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")


def refuse_unsupported(option: str | None) -> None:
    """A 400 naming an option of OpenAI's that this server does not implement (None: none was used)."""
    if option is not None:
        raise OpenAIError(
            400, f"'{option}' is not supported by this server", param=option, code="unsupported_parameter"
        )


def check_chat(body: ChatCompletionRequest) -> None:
    """What Chat's own fields must agree on, each refusal naming its parameter."""
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if body.tool_choice not in (None, "none") and not body.tools:
        raise OpenAIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in names(body):
        raise OpenAIError(400, f"'tool_choice' names '{body.tool_choice.function.name}', which is not in 'tools'",
                          param="tool_choice")
    if error := parameters_error(_functions(body)):
        raise OpenAIError(400, f"tools: {error}", param="tools")


def chat_request(body: ChatCompletionRequest, default_system_prompt: str) -> dict[str, object]:
    """The internal request as a dict, validated by the admission path like any other; tools as
    app/openai/tools.py maps them."""
    turns = []
    for message in body.messages:
        if message.role == "tool":
            turns.append(result_turn(message.text()))
        elif message.role == "assistant":
            turns.append(call_turn(message.text(), [Call(c.function.name, c.function.arguments)
                                                    for c in message.tool_calls or []]))
        else:
            turns.append({"role": ROLES[message.role], "content": message.text()})
    tools = tool_fields(turns, _functions(body), body.tool_mode(), body.parallel_tool_calls, default_system_prompt)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _sampling(body, body.max_completion_tokens or body.max_tokens) | tools | _set(logprobs=logprobs)


class ChatStream:
    """A streamed chat answer's chunks: the content as the tools let it go out, each with its tokens'
    log probabilities when asked for (those of text held back go with the next chunk), and at the end
    the text held back, the calls and the finishing chunk."""

    def __init__(
        self, body: ChatCompletionRequest, task_id: str, tokenizer: Tokenizer,
        chunk: Callable[[Delta, str | None, ChoiceLogprobs | None], str],
    ) -> None:
        self._task_id = task_id
        self._tokenizer = tokenizer
        self._chunk = chunk
        self._logprobs = body.logprobs
        self._tools = ToolStream(body.tool_mode(), names(body))
        self._scored: Scored = []

    def delta(self, entry: StreamEntry) -> list[str]:
        content = self._tools.content(entry.text or "")
        if self._logprobs:
            self._scored += zip(entry.token_ids, entry.logprobs)
        return [self._chunk(Delta(content=content), None, self._take_logprobs())] if content else []

    def last(self, view: TaskView) -> list[str]:
        rest, calls = self._tools.end()
        deltas = [DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(tool_calls(calls, self._task_id))]
        return [
            *([self._chunk(Delta(content=rest), None, self._take_logprobs())] if rest else []),
            *([self._chunk(Delta(tool_calls=deltas), None, self._take_logprobs())] if deltas else []),
            self._chunk(Delta(), finish_reason(view, deltas), self._take_logprobs()),
        ]

    def _take_logprobs(self) -> ChoiceLogprobs | None:
        if not self._scored:
            return None
        scored, self._scored = self._scored, []
        return chat_logprobs(scored, self._tokenizer)


def answer_of(body: ChatCompletionRequest, text: str, task_id: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and its tool calls."""
    content, calls = read_answer(text, body.tool_mode(), names(body))
    return content, tool_calls(calls, task_id)


def tool_calls(calls: list[Call], task_id: str) -> list[ToolCall]:
    return [ToolCall(id=call_id(task_id, i), function=FunctionCall(name=c.name, arguments=c.arguments))
            for i, c in enumerate(calls)]


def names(body: ChatCompletionRequest) -> set[str]:
    return {tool.function.name for tool in body.tools or []}


def _functions(body: ChatCompletionRequest) -> list[Function]:
    functions = [Function(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    return offered(functions, body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None)


def completion_requests(body: CompletionRequest) -> list[dict[str, object]]:
    """A request per prompt of the batch: each the model's raw input (no chat template, no system
    prompt), as text or token ids."""
    batch = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
    prompts = body.prompt if batch else [body.prompt]
    if not prompts or len(prompts) * body.n > MAX_CHOICES:
        raise OpenAIError(400, f"prompt: give 1 to {MAX_CHOICES // body.n} prompts (times n, at most {MAX_CHOICES})",
                          param="prompt")
    common = _sampling(body, body.max_tokens) | _set(logprobs=body.logprobs)
    return [common | ({"prompt": p, "raw": True} if isinstance(p, str) else {"prompt_ids": p}) for p in prompts]


def choices(requests: list[dict[str, object]], body: Sampling) -> list[dict[str, object]]:
    """`n` tasks for each request, in OpenAI's order of choices (each prompt's n together); with a seed,
    each choice its own (seed + its place), so that choices differ yet each is reproducible."""
    tasks = []
    for fields in requests:
        for i in range(body.n):
            tasks.append(fields | ({"seed": body.seed + i} if body.seed is not None else {}))
    return tasks


def _set(**values: object) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}


Scored = list[tuple[int, list | None]]  # each token and its `[logprob, [[id, logprob], ...]]` (TaskStore.logprobs)


def chat_logprobs(tokens: Scored, tokenizer: Tokenizer) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float | None) -> TopLogprob:
        return TopLogprob(**scored_token(tokenizer, token_id, logprob))

    return ChoiceLogprobs(content=[
        ContentLogprob(**top(token_id, scored[0] if scored else None).model_dump(),
                       top_logprobs=[top(i, lp) for i, lp in (scored[1] if scored else [])])
        for token_id, scored in spoken(tokenizer, tokens)
    ])


def completion_logprobs(tokens: Scored, tokenizer: Tokenizer, offset: int = 0) -> CompletionLogprobs:
    """`offset`: where these tokens' text starts in the answer (a streamed chunk's)."""
    tokens = spoken(tokenizer, tokens)
    texts = [token_text(tokenizer, token_id) for token_id, _ in tokens]
    offsets = [offset + sum(len(text) for text in texts[:i]) for i in range(len(texts))]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[scored[0] if scored else None for _, scored in tokens],
        top_logprobs=[{token_text(tokenizer, i): lp for i, lp in (scored[1] if scored else [])} for _, scored in tokens],
        text_offset=offsets,
    )


def _sampling(body: Sampling, max_tokens: int | None) -> dict[str, object]:
    """Only what the client set: the rest takes the server's defaults, as for /generate."""
    return _set(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=body.stops() or None,
        json_schema=body.response_format.schema_wanted() if body.response_format else body.json_schema,
        grammar=body.grammar,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.logit_bias,
    )


def finish_reason(view: TaskView, calls: list[ToolCall] | None = None) -> str:
    """OpenAI knows `stop` (the model ended, a stop string, or a cancel), `length` (the token or
    time limit) and `tool_calls` (the answer is calls)."""
    if calls:
        return "tool_calls"
    return "length" if view.finish_reason in ("length", "timeout") else "stop"


def usage(views: list[TaskView], n: int) -> Usage:
    """Every choice's completion tokens; each prompt's tokens once (the first of its `n` choices)."""
    prompt = sum(view.usage.prompt_tokens for view in views[::n] if view.usage)
    completion = sum(view.usage.completion_tokens for view in views if view.usage)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def fingerprint(settings: Settings) -> str:
    """OpenAI's `system_fingerprint`: what serves the answers (model, engine, quantization), so that a
    client can tell when that changes, as OpenAI's changes with its backend."""
    served = f"{model_name(settings)}:{settings.engine}:{settings.quantization}"
    return "fp_" + hashlib.sha256(served.encode()).hexdigest()[:10]


def created_now() -> int:
    return int(time.time())

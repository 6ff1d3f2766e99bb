"""OpenAI requests onto the one internal request, and task results back into OpenAI's shapes."""

import time

from app.openai.errors import OpenAIError
from app.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionCall,
    Message,
    NamedToolChoice,
    Sampling,
    ToolCall,
    Usage,
)
from core.protocol import Role, TaskView
from prompts.tools import (
    Call,
    Function,
    call_may_start,
    call_text,
    calls_schema,
    constrained_calls,
    read_calls,
    result_text,
    tools_prompt,
)

ROLES = {
    "system": Role.system, "developer": Role.system, "user": Role.user, "assistant": Role.assistant, "tool": Role.user,
}


def check_model(model: str, served: list[str]) -> None:
    if model not in served:
        raise OpenAIError(
            404, f"the model '{model}' does not exist; this server serves {', '.join(served)}",
            param="model", code="model_not_found",
        )


def check_supported(body: Sampling, served: list[str]) -> None:
    """The model must be one this server serves; options it cannot honour are refused by name."""
    check_model(body.model, served)
    if body.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    refuse_unsupported(body.first_used())


def refuse_unsupported(option: str | None) -> None:
    """A 400 naming an option of OpenAI's that this server does not implement (None: none was used)."""
    if option is not None:
        raise OpenAIError(
            400, f"'{option}' is not supported by this server", param=option, code="unsupported_parameter"
        )


def check_tools(body: ChatCompletionRequest) -> None:
    if body.tool_choice not in (None, "none") and not body.tools:
        raise OpenAIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in _names(body):
        raise OpenAIError(400, f"'tool_choice' names '{body.tool_choice.function.name}', which is not in 'tools'",
                          param="tool_choice")


def chat_request(body: ChatCompletionRequest, default_system_prompt: str) -> dict[str, object]:
    """The internal request as a dict, validated by the admission path like any other. Tools become
    prompt text (prompts/tools.py), and a call the answer must make becomes its schema."""
    turns = _turns(body.messages)
    functions = _functions(body)
    if functions:
        if turns[0]["role"] == Role.system:
            turns[0]["content"] += "\n\n" + tools_prompt(functions)
        else:
            system = "\n\n".join(part for part in (default_system_prompt, tools_prompt(functions)) if part)
            turns.insert(0, {"role": Role.system, "content": system})
    fields = _sampling(body, body.max_completion_tokens or body.max_tokens) | {"messages": turns}
    if body.tool_mode() in ("required", "named"):
        fields["json_schema"] = calls_schema(functions, parallel=body.tool_mode() == "required" and body.parallel_tool_calls)
    return fields


def answer_of(body: ChatCompletionRequest, text: str, task_id: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and its tool calls."""
    mode = body.tool_mode()
    if mode == "none":
        return text, []
    if mode == "auto":
        content, calls = read_calls(text, _names(body))
    else:
        calls = constrained_calls(text)
        content = None if calls else text  # cut short by the token limit: the text as it stands
    return (content or None) if calls else content, tool_calls(calls, task_id)


class ToolStream:
    """A streamed answer that may hold calls: the text that can go out as content at once (all of it
    without tools; none when the answer must be calls; under `auto`, all but what may be a call
    starting), and at the end the rest and the calls."""

    def __init__(self, body: ChatCompletionRequest, task_id: str) -> None:
        self._body = body
        self._task_id = task_id
        self._mode = body.tool_mode()
        self._text = ""
        self._sent = 0

    def content(self, piece: str) -> str:
        self._text += piece
        if self._mode in ("required", "named"):
            return ""
        end = len(self._text) if self._mode == "none" else call_may_start(self._text)
        sent, self._sent = self._sent, max(self._sent, end)
        return self._text[sent:end]

    def end(self) -> tuple[str, list[ToolCall]]:
        """The content still held back, and the calls."""
        _, calls = answer_of(self._body, self._text, self._task_id)
        return ("" if calls else self._text[self._sent :]), calls


def tool_calls(calls: list[Call], task_id: str) -> list[ToolCall]:
    """Each call's id is its task's and its place, so every read of the answer names it alike."""
    stem = task_id.replace("-", "")[:24]
    return [
        ToolCall(id=f"call_{stem}_{i}", function=FunctionCall(name=call.name, arguments=call.arguments))
        for i, call in enumerate(calls)
    ]


def _names(body: ChatCompletionRequest) -> set[str]:
    return {tool.function.name for tool in body.tools or []}


def _functions(body: ChatCompletionRequest) -> list[Function]:
    """The functions the model is offered: none under tool_choice "none", only the named one when one is."""
    mode = body.tool_mode()
    if mode == "none":
        return []
    functions = [Function(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    if isinstance(body.tool_choice, NamedToolChoice):
        return [f for f in functions if f.name == body.tool_choice.function.name]
    return functions


def _turns(messages: list[Message]) -> list[dict]:
    """Messages as turns: an assistant's calls as the text the model writes for them, tool results as a
    user turn, and turns of the same role in a row (the results of parallel calls) joined into one."""
    turns: list[dict] = []
    for message in messages:
        role = ROLES[message.role]
        if message.role == "tool":
            content = result_text(message.text())
        else:
            calls = [call_text(Call(c.function.name, c.function.arguments)) for c in message.tool_calls or []]
            content = "\n".join(part for part in (message.text(), *calls) if part)
        if turns and turns[-1]["role"] == role != Role.system:
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


def completion_request(body: CompletionRequest) -> dict[str, object]:
    """A Completions prompt is the model's raw input: no chat template, no system prompt."""
    return _sampling(body, body.max_tokens) | {"prompt": body.prompt, "raw": True}


def _sampling(body: Sampling, max_tokens: int | None) -> dict[str, object]:
    """Only what the client set: the rest takes the server's defaults, as for /generate."""
    values = {
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stops() or None,
        "json_schema": body.response_format.schema_wanted() if body.response_format else None,
    }
    return {key: value for key, value in values.items() if value is not None}


def finish_reason(view: TaskView, calls: list[ToolCall] | None = None) -> str:
    """OpenAI knows `stop` (the model ended, a stop string, or a cancel), `length` (the token or
    time limit) and `tool_calls` (the answer is calls)."""
    if calls:
        return "tool_calls"
    return "length" if view.finish_reason in ("length", "timeout") else "stop"


def usage(view: TaskView) -> Usage:
    prompt = view.usage.prompt_tokens if view.usage else 0
    completion = view.usage.completion_tokens if view.usage else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def created_now() -> int:
    return int(time.time())

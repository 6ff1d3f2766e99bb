"""OpenAI's function tools, for Chat and Responses alike: onto the internal request, and calls back out.

The worker knows nothing of tools. A family hands this module its conversation as turns (an
assistant's calls and the tools' results already written as prompt text by `call_turn` and
`result_turn`), the functions offered and how the answer may call them; it gets back the internal
request's `messages` (the functions offered in the system prompt, in prompts/tools.py's
convention) and, for an answer that must call, the schema it is decoded under. Reading the answer,
`read_answer` and `ToolStream` give its content and calls, which each family shapes its own way.
"""

from typing import Literal

from app.errors import field_error
from core.constraints import schema_error
from core.protocol import Role
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

Mode = Literal["none", "auto", "required", "named"]  # named: the one function offered must be called
Turn = dict[str, str]  # {"role": Role, "content": text}, as the internal request's messages


def offered(functions: list[Function], named: str | None) -> list[Function]:
    """The functions the model is offered: only the one named when tool_choice names one."""
    return [function for function in functions if named is None or function.name == named]


def parameters_error(functions: list[Function]) -> str | None:
    """Why a function's `parameters` cannot constrain its arguments, naming the function; None if all can."""
    for function in functions:
        if function.parameters is not None and (error := schema_error(function.parameters)):
            return f"the parameters of '{function.name}' cannot constrain its arguments: {error}"
    return None


def call_turn(content: str, calls: list[Call]) -> Turn:
    """An assistant turn with the calls it made, as the model would have written them."""
    return {"role": Role.assistant, "content": "\n".join(part for part in (content, *map(call_text, calls)) if part)}


def result_turn(output: str) -> Turn:
    return {"role": Role.user, "content": result_text(output)}


def tool_fields(
    turns: list[Turn], functions: list[Function], mode: Mode, parallel: bool, default_system_prompt: str
) -> dict[str, object]:
    """The internal request's `messages` (turns of one role in a row, such as parallel calls' results,
    joined, but for the answer begun at the end, which is one message), with the functions offered in the system prompt, and the answer's `json_schema` when it
    must call one."""
    if len(turns) > 1 and turns[-1]["role"] == turns[-2]["role"] == Role.assistant:
        # Only the last message can be the answer begun (llama-server refuses the same).
        raise field_error("messages", "cannot have 2 or more assistant messages at the end of the list")
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"] != Role.system:
            merged[-1] = {"role": turn["role"], "content": merged[-1]["content"] + "\n" + turn["content"]}
        else:
            merged.append(dict(turn))
    fields: dict[str, object] = {"messages": merged}
    if mode == "none" or not functions:
        return fields
    if merged[0]["role"] == Role.system:
        merged[0]["content"] += "\n\n" + tools_prompt(functions)
    else:
        system = "\n\n".join(part for part in (default_system_prompt, tools_prompt(functions)) if part)
        merged.insert(0, {"role": Role.system, "content": system})
    if mode in ("required", "named"):
        fields["json_schema"] = calls_schema(functions, parallel=mode == "required" and parallel)
    return fields


def read_answer(text: str, mode: Mode, names: set[str]) -> tuple[str | None, list[Call]]:
    """The answer's content (None when it is only calls) and its calls."""
    if mode == "none":
        return text, []
    if mode == "auto":
        content, calls = read_calls(text, names)
    else:
        calls = constrained_calls(text)
        content = "" if calls else text  # cut short by the token limit: the text as it stands
    return (content or None) if calls else content, calls


def call_id(task_id: str, index: int) -> str:
    """A call's id is its task's and its place, so every read of the answer names it alike."""
    return f"call_{task_id.replace('-', '')[:24]}_{index}"


class ToolStream:
    """A streamed answer that may hold calls: the text that can go out as content at once (all of it
    without tools; none when the answer must be calls; under `auto`, all but what may be a call
    starting), and at the end the rest and the calls."""

    def __init__(self, mode: Mode, names: set[str]) -> None:
        self._mode = mode
        self._names = names
        self._text = ""
        self._sent = 0

    def content(self, piece: str) -> str:
        self._text += piece
        if self._mode in ("required", "named"):
            return ""
        end = len(self._text) if self._mode == "none" else call_may_start(self._text)
        sent, self._sent = self._sent, max(self._sent, end)
        return self._text[sent:end]

    def end(self) -> tuple[str, list[Call]]:
        """The content still held back, and the calls."""
        _, calls = read_answer(self._text, self._mode, self._names)
        return ("" if calls else self._text[self._sent :]), calls

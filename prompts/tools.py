"""Tools as prompt text, and tool calls read back out of an answer, in the Hermes convention.

Neither Llama-2 nor the embedded SmolLM2 has a tool format of its own (SmolLM2's template is
plain ChatML), so tools reach every model the way Hermes, Qwen 2.5 and SmolLM3 were trained to
read them: the functions' signatures as JSON inside `<tools>` in the system prompt, each call the
model makes as `{"name": ..., "arguments": {...}}` inside `<tool_call>`, and each result given
back inside `<tool_response>` in a user turn. A request that must call a tool (`required`, or one
function named) is constrained to the calls' JSON itself (`calls_schema`), so its arguments always
validate; under `auto` the model chooses, and `read_calls` takes calls it wrote out of its text.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

from core.constraints import ANY_OBJECT

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8  # bounds a required answer's list of calls, so a small model cannot repeat calls forever
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any] | None


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


def tools_prompt(functions: list[Function]) -> str:
    """The system prompt's part that offers the functions."""
    signatures = "\n".join(
        json.dumps({"type": "function", "function": {"name": f.name, "description": f.description or "",
                                                     "parameters": f.parameters or ANY_OBJECT}})
        for f in functions
    )
    return (
        "You may call one or more functions to help with the user's request. The functions are given as JSON "
        f"signatures within <tools></tools>:\n<tools>\n{signatures}\n</tools>\nFor each function call, return a "
        f'JSON object with the function\'s name and arguments within {CALL_OPEN}{CALL_CLOSE}:\n'
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def call_text(call: Call) -> str:
    """A call an assistant made earlier, written as the model would have written it."""
    try:
        arguments: object = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = call.arguments
    return f"{CALL_OPEN}\n{json.dumps({'name': call.name, 'arguments': arguments})}\n{CALL_CLOSE}"


def result_text(content: str) -> str:
    """A tool's result, given back to the model in a user turn."""
    return f"<tool_response>\n{content}\n</tool_response>"


def calls_schema(functions: list[Function], parallel: bool) -> dict[str, Any]:
    """What an answer that must call one of `functions` is constrained to: one call, or with `parallel`
    a list of one to MAX_PARALLEL_CALLS calls."""
    one = [
        {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters or ANY_OBJECT},
         "required": ["name", "arguments"], "additionalProperties": False}
        for f in functions
    ]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if not parallel:
        return call
    return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}


def constrained_calls(text: str) -> list[Call]:
    """The calls of an answer constrained by `calls_schema` (empty if it was cut short)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [_call(item) for item in (value if isinstance(value, list) else [value])]


def read_calls(text: str, names: set[str]) -> tuple[str, list[Call]]:
    """The text before the first call, and the calls a free answer wrote: none unless every
    `<tool_call>` in it holds a call of a known function (then the whole answer is text)."""
    found = _CALL.findall(text)
    if CALL_OPEN not in text or not found:
        return text, []
    calls = []
    for body in found:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(value, dict) or value.get("name") not in names or not isinstance(value.get("arguments"), dict):
            return text, []
        calls.append(_call(value))
    return text[: text.index(CALL_OPEN)].strip(), calls


def call_may_start(text: str) -> int:
    """Where a call may be starting in streamed text: the index of `<tool_call>` or of a tail that
    could grow into it; len(text) when no call can be starting."""
    if (at := text.find(CALL_OPEN)) >= 0:
        return at
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def _call(value: dict[str, Any]) -> Call:
    return Call(name=value["name"], arguments=json.dumps(value["arguments"]))

"""Responses requests onto the one internal request, and tasks back into responses.

A response's id is its task's (`resp_<task id>`), and what it echoes of its request (model name,
instructions, settings with the server's defaults filled in, metadata) is kept with the task as
its annotation, so any API process, started before or after, can answer for it.
"""

import time

from pydantic import ValidationError

from app.openai.convert import ROLES, refuse_unsupported
from app.openai.tools import (
    Mode,
    Turn,
    call_id,
    call_turn,
    offered,
    parameters_error,
    read_answer,
    result_turn,
    tool_fields,
)
from app.openai.errors import OpenAIError
from app.openai.responses.protocol import (
    FunctionCallInput,
    FunctionCallOutput,
    FunctionChoice,
    FunctionTool,
    IncompleteDetails,
    InputItem,
    OutputFunctionCall,
    OutputItem,
    ItemStatus,
    OutputMessage,
    OutputText,
    Response,
    ResponseCreateRequest,
    ResponseError,
    ResponseStatus,
    ResponseUsage,
    ResponseSettings,
    TextConfig,
)
from core.protocol import GenerateRequest, Role, TaskStatus, TaskView
from prompts.tools import Call, Function

PREFIX = "resp_"
# The output message's status, for each response status that has one (the rest: incomplete).
ITEM_STATUSES: dict[ResponseStatus, ItemStatus] = {"completed": "completed", "in_progress": "in_progress"}


def response_id(task_id: str) -> str:
    return f"{PREFIX}{task_id}"


def item_id(task_id: str) -> str:
    return f"msg_{task_id}"


def task_id_of(response_id: str) -> str:
    """The task behind a response id; the id's form is checked by the caller, as for any task id."""
    return response_id.removeprefix(PREFIX) if response_id.startswith(PREFIX) else ""


def check_supported(body: ResponseCreateRequest) -> None:
    refuse_unsupported(body.first_used())
    if body.text is not None and body.text.format.type == "json_schema" and body.text.format.schema_ is None:
        raise OpenAIError(400, "text.format: 'schema' is required when type is 'json_schema'", param="text.format")
    if body.background and not body.store:
        raise OpenAIError(400, "a background response must be stored: drop store=false", param="store")
    for i, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise OpenAIError(400, f"tools[{i}]: only function tools are supported, not {str(tool.get('type'))[:40]!r}",
                              param="tools", code="unsupported_value")
    functions = _functions(body)
    if body.tool_choice not in (None, "none") and not functions:
        raise OpenAIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if isinstance(body.tool_choice, FunctionChoice) and body.tool_choice.name not in {f.name for f in functions}:
        raise OpenAIError(400, f"'tool_choice' names '{body.tool_choice.name}', which is not in 'tools'",
                          param="tool_choice")
    if error := parameters_error(functions):
        raise OpenAIError(400, f"tools: {error}", param="tools")


def function_tools(body: ResponseCreateRequest) -> list[FunctionTool]:
    """The request's tools, read as functions (check_supported has refused any other kind)."""
    try:
        return [FunctionTool.model_validate(tool) for tool in body.tools or []]
    except ValidationError as exc:
        error = exc.errors()[0]
        raise OpenAIError(400, f"tools: {error['msg']} at {'.'.join(map(str, error['loc']))}", param="tools") from None


def internal_fields(body: ResponseCreateRequest, default_system_prompt: str) -> dict[str, object]:
    """The internal request as a dict, validated by the admission path like any other; function calls and
    their outputs as turns, and the tools as app/openai/tools.py maps them (into the system turn, made
    of `instructions` or the default system prompt when `input` has none)."""
    turns = [{"role": Role.user, "content": body.input}] if isinstance(body.input, str) else _turns(body.input)
    mode = tool_mode(body)
    named = body.tool_choice.name if isinstance(body.tool_choice, FunctionChoice) else None
    functions = offered(_functions(body), named)
    system_prompt = body.instructions
    if mode != "none" and turns[0]["role"] != Role.system:
        system, system_prompt = (default_system_prompt if body.instructions is None else body.instructions), None
        turns.insert(0, {"role": Role.system, "content": system})
    values = {
        **tool_fields(turns, functions, mode, body.parallel_tool_calls, ""),
        "system_prompt": system_prompt,
        "max_new_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
    }
    if "json_schema" not in values and body.text:
        values["json_schema"] = body.text.format.schema_wanted()
    return {key: value for key, value in values.items() if value is not None}


def _functions(body: ResponseCreateRequest) -> list[Function]:
    return [Function(tool.name, tool.description, tool.parameters) for tool in function_tools(body)]


def tool_mode(body: ResponseCreateRequest | ResponseSettings) -> Mode:
    """How the answer may call tools: "named" when tool_choice names the one function to call."""
    if isinstance(body.tool_choice, FunctionChoice):
        return "named"
    return (body.tool_choice or "auto") if body.tools else "none"


def _turns(items: list[InputItem]) -> list[Turn]:
    turns: list[Turn] = []
    for item in items:
        if isinstance(item, FunctionCallOutput):
            turns.append(result_turn(item.output))
        elif isinstance(item, FunctionCallInput):
            turns.append(call_turn("", [Call(item.name, item.arguments)]))
        elif item.role == "assistant":
            turns.append(call_turn(item.text(), []))
        else:
            turns.append({"role": ROLES[item.role], "content": item.text()})
    return turns


def settings_of(body: ResponseCreateRequest, request: GenerateRequest) -> ResponseSettings:
    """What the response echoes: the request as the worker runs it (defaults resolved)."""
    assert request.max_new_tokens is not None and request.temperature is not None and request.top_p is not None
    return ResponseSettings(
        model=body.model,
        created_at=int(time.time()),
        instructions=body.instructions,
        max_output_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        background=body.background,
        store=body.store,
        metadata=body.metadata or {},
        user=body.user,
        text=body.text or TextConfig(),
        tools=function_tools(body),
        tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
        parallel_tool_calls=body.parallel_tool_calls,
    )


def response(task_id: str, settings: ResponseSettings, view: TaskView | None) -> Response:
    """The response as it stands; `view` None means it has just been queued."""
    status = status_of(view) if view is not None else "queued"
    base = Response(id=response_id(task_id), status=status, output=[], **settings.model_dump())
    if view is None:
        return base
    update: dict[str, object] = {"output": _output(task_id, view, status, settings)}
    if view.usage is not None:
        used = view.usage.prompt_tokens + view.usage.completion_tokens
        update["usage"] = ResponseUsage(
            input_tokens=view.usage.prompt_tokens, output_tokens=view.usage.completion_tokens, total_tokens=used
        )
    if view.timings is not None:
        update["completed_at"] = int(settings.created_at + view.timings.total_s)
    if status == "failed":
        update["error"] = ResponseError(code="server_error", message=view.error or "the generation failed")
    if status == "incomplete":
        update["incomplete_details"] = IncompleteDetails(reason="max_output_tokens")
    return base.model_copy(update=update)


def status_of(view: TaskView) -> ResponseStatus:
    """The time limit (TASK_TIME_LIMIT_S) ends a response `incomplete` too: it is the server's output limit."""
    if view.status == TaskStatus.succeeded:
        return "incomplete" if view.finish_reason in ("length", "timeout") else "completed"
    statuses: dict[TaskStatus, ResponseStatus] = {
        TaskStatus.queued: "queued", TaskStatus.running: "in_progress",
        TaskStatus.failed: "failed", TaskStatus.cancelled: "cancelled",
    }
    return statuses[view.status]


def _output(task_id: str, view: TaskView, status: ResponseStatus, settings: ResponseSettings) -> list[OutputItem]:
    """One assistant message once there is text (or once the task succeeded, even with none); with tools,
    once the answer has ended, its text (if any) and a function_call item per call."""
    if status in ("queued", "failed") or (not view.text and status != "completed"):
        return []
    item_status = ITEM_STATUSES.get(status, "incomplete")
    mode = tool_mode(settings)
    if mode == "none":
        return [OutputMessage(id=item_id(task_id), status=item_status, content=[OutputText(text=view.text)])]
    if status == "in_progress":
        return []  # the text may yet turn out to be calls
    content, calls = read_answer(view.text, mode, {tool.name for tool in settings.tools})
    items: list[OutputItem] = []
    if content is not None:
        items.append(OutputMessage(id=item_id(task_id), status=item_status, content=[OutputText(text=content)]))
    for i, call in enumerate(calls):
        items.append(OutputFunctionCall(id=f"fc_{call_id(task_id, i).removeprefix('call_')}", call_id=call_id(task_id, i),
                                        name=call.name, arguments=call.arguments))
    return items

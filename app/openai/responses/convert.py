"""Responses requests onto the one internal request, and tasks back into responses.

A response's id is its task's (`resp_<task id>`), and what it echoes of its request (model name,
instructions, settings with the server's defaults filled in, metadata) is kept with the task as
its annotation, so any API process, started before or after, can answer for it.
"""

import time

from app.openai.convert import ROLES, check_model, refuse_unsupported
from app.openai.errors import OpenAIError
from app.openai.responses.protocol import (
    IncompleteDetails,
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


def check_supported(body: ResponseCreateRequest, served: list[str]) -> None:
    check_model(body.model, served)
    refuse_unsupported(body.first_used())
    if body.text is not None and body.text.format.type == "json_schema" and body.text.format.schema_ is None:
        raise OpenAIError(400, "text.format: 'schema' is required when type is 'json_schema'", param="text.format")
    if body.background and not body.store:
        raise OpenAIError(400, "a background response must be stored: drop store=false", param="store")


def internal_fields(body: ResponseCreateRequest) -> dict[str, object]:
    """The internal request as a dict, validated by the admission path like any other."""
    if isinstance(body.input, str):
        messages = [{"role": Role.user, "content": body.input}]
    else:
        messages = [{"role": ROLES[turn.role], "content": turn.text()} for turn in body.input]
    values = {
        "messages": messages,
        "system_prompt": body.instructions,
        "max_new_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "json_schema": body.text.format.schema_wanted() if body.text else None,
    }
    return {key: value for key, value in values.items() if value is not None}


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
    )


def response(task_id: str, settings: ResponseSettings, view: TaskView | None) -> Response:
    """The response as it stands; `view` None means it has just been queued."""
    status = _status(view) if view is not None else "queued"
    base = Response(id=response_id(task_id), status=status, output=[], **settings.model_dump())
    if view is None:
        return base
    update: dict[str, object] = {"output": _output(task_id, view, status)}
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


def _status(view: TaskView) -> ResponseStatus:
    """The time limit (TASK_TIME_LIMIT_S) ends a response `incomplete` too: it is the server's output limit."""
    if view.status == TaskStatus.succeeded:
        return "incomplete" if view.finish_reason in ("length", "timeout") else "completed"
    statuses: dict[TaskStatus, ResponseStatus] = {
        TaskStatus.queued: "queued", TaskStatus.running: "in_progress",
        TaskStatus.failed: "failed", TaskStatus.cancelled: "cancelled",
    }
    return statuses[view.status]


def _output(task_id: str, view: TaskView, status: ResponseStatus) -> list[OutputMessage]:
    """One assistant message once there is text (or once the task succeeded, even with none)."""
    if status in ("queued", "failed") or (not view.text and status != "completed"):
        return []
    item_status = ITEM_STATUSES.get(status, "incomplete")
    return [OutputMessage(id=item_id(task_id), status=item_status, content=[OutputText(text=view.text)])]

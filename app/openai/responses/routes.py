"""/v1/responses: create, retrieve (or stream again from any event), cancel and delete.

A response is a task: its record and chunk stream in Redis are all there is, so a background
response outlives its client, the API process that took it and a Redis restart, and any API
process streams it again, numbered as before (see `events`).
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import anyio
import redis
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response as HTTPResponse
from fastapi.sse import ServerSentEvent

from app import webhooks
from app.admission import admit, input_tokens, internal_request
from app.deps import Services, ServicesDep
from app.errors import family_route
from app.openai.errors import RESPONSES, OpenAIError
from app.openai.responses import convert
from app.openai.responses.events import ResponseEvents
from app.openai.responses.protocol import (
    Event,
    Response,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseSettings,
)
from app.openai.convert import model_named
from app.openai.protocol import InputTokens
from app.openai.routes import served_models
from app.security import CallerTag, visible_task_id
from app.sse import sse_response
from app.streams import CLIENT_GONE, admit_streaming, follow, hold_stream, until_ended

router = APIRouter(route_class=family_route(RESPONSES))
CANCEL_WAIT_S = 10.0


@dataclass(frozen=True)
class Stored:
    """A response that exists for this caller: its task id and what it echoes of its request."""

    task_id: str
    settings: ResponseSettings


def stored_response(response_id: str, services: ServicesDep, caller: CallerTag) -> Stored:
    """404 for an id that is not a response this caller may see (another key's, one made with
    store=false, or a plain task's)."""
    missing = OpenAIError(404, f"no response with id '{response_id[:80]}'", param="response_id", code="not_found")
    try:
        task_id = visible_task_id(convert.task_id_of(response_id), caller, services)
    except HTTPException as exc:
        raise missing from exc
    annotation = services.store.annotation(task_id)
    if annotation is None:
        raise missing
    settings = ResponseSettings.model_validate_json(annotation)
    if not settings.store:
        raise missing
    return Stored(task_id, settings)


StoredResponse = Annotated[Stored, Depends(stored_response)]


@router.post("/responses", response_model=Response)
async def create_response(
    body: ResponseCreateRequest, request: Request, services: ServicesDep, caller: CallerTag
) -> HTTPResponse:
    body.model = model_named(body.model, served_models(services), services.settings.any_model_name)
    convert.check_supported(body)
    fields = convert.internal_fields(body, services.settings.default_system_prompt)
    internal = internal_request(fields).with_defaults(services.settings)
    settings = convert.settings_of(body, internal)
    background = body.background or body.service_tier == "flex"
    task_id, on_close = await admit_streaming(
        services, caller, body.stream,
        lambda: run_in_threadpool(admit, internal, services, caller, settings.model_dump_json(), background),
    )
    headers = {"X-Task-Id": task_id}
    if body.background:
        await run_in_threadpool(webhooks.watch_response, services, task_id, caller)
    if body.stream:
        events = _events(services, task_id, settings, -1, cancel_on_leave=not body.background)
        return sse_response(events, headers, on_close)
    if body.background:
        return JSONResponse(convert.response(task_id, settings, None).model_dump(), headers=headers)
    if not await until_ended(services, task_id, request.is_disconnected):
        return HTTPResponse(status_code=CLIENT_GONE)
    return JSONResponse((await _current(services, task_id, settings)).model_dump(), headers=headers)


@router.post("/responses/input_tokens", response_model=InputTokens)
async def count_input_tokens(body: ResponseCreateRequest, services: ServicesDep) -> InputTokens:
    """The tokens the response's input takes (instructions and tools included); nothing is queued."""
    body.model = model_named(body.model, served_models(services), services.settings.any_model_name)
    convert.check_supported(body)
    internal = internal_request(convert.internal_fields(body, services.settings.default_system_prompt))
    return InputTokens(input_tokens=await input_tokens(internal, services))


@router.get("/responses/{response_id}", response_model=Response)
async def retrieve_response(
    stored: StoredResponse,
    services: ServicesDep,
    caller: CallerTag,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1, description="Stream the events after this sequence number.")] = -1,
) -> HTTPResponse:
    if stream:
        on_close = await hold_stream(services, caller)
        events = _events(services, stored.task_id, stored.settings, starting_after, cancel_on_leave=False)
        return sse_response(events, {"X-Task-Id": stored.task_id}, on_close)
    return JSONResponse((await _current(services, stored.task_id, stored.settings)).model_dump())


@router.post("/responses/{response_id}/cancel", response_model=Response)
async def cancel_response(stored: StoredResponse, request: Request, services: ServicesDep) -> Response:
    """Idempotent: a response that has already ended is answered as it is. Waits (a little) for a
    running one to stop, so that the answer says `cancelled`."""
    if not stored.settings.background:
        raise OpenAIError(400, "only a background response can be cancelled", param="response_id")
    await run_in_threadpool(services.store.request_cancel, stored.task_id)
    with anyio.move_on_after(CANCEL_WAIT_S):
        await until_ended(services, stored.task_id, request.is_disconnected)
    return await _current(services, stored.task_id, stored.settings)


@router.delete("/responses/{response_id}", response_model=ResponseDeleted)
def delete_response(stored: StoredResponse, services: ServicesDep) -> ResponseDeleted:
    """A running response is cancelled first, so its worker stops and writes nothing more."""
    services.store.request_cancel(stored.task_id)
    services.store.delete(stored.task_id)
    return ResponseDeleted(id=convert.response_id(stored.task_id))


async def _current(services: Services, task_id: str, settings: ResponseSettings) -> Response:
    view = await run_in_threadpool(services.store.view, task_id)
    if view is None:
        raise OpenAIError(404, f"the response {convert.response_id(task_id)} has expired", code="not_found")
    return convert.response(task_id, settings, view)


async def _events(
    services: Services, task_id: str, settings: ResponseSettings, after: int, cancel_on_leave: bool
) -> AsyncIterator[ServerSentEvent]:
    """The response's events after `after`, live; a client that leaves a plain (not background)
    streamed response cancels it, so that the model is freed at once."""
    queued = convert.response(task_id, settings, None)
    numbering = ResponseEvents(convert.item_id(task_id), queued, after, convert.tool_mode(settings) != "none")
    try:
        async for event in _numbered(services, task_id, settings, numbering):
            yield ServerSentEvent(event=event.type, raw_data=event.model_dump_json())
    except (GeneratorExit, anyio.get_cancelled_exc_class()):
        if cancel_on_leave:
            services.store.request_cancel(task_id)
        raise


async def _numbered(
    services: Services, task_id: str, settings: ResponseSettings, numbering: ResponseEvents
) -> AsyncIterator[Event]:
    for event in numbering.start():
        yield event
    try:
        async for entry in follow(services.aredis, task_id):
            if entry.ended:
                break
            for event in numbering.chunk(entry.text or ""):
                yield event
        view = await run_in_threadpool(services.store.view, task_id)
    except redis.RedisError:
        yield numbering.broken("the task queue (Redis) is unreachable; resume from the last event before this one")
        return
    if view is None:
        yield numbering.broken("the response has expired")
        return
    for event in numbering.end(convert.response(task_id, settings, view)):
        yield event

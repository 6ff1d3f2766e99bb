"""GET /task/{id}: progress, chunks after a cursor, and the result once finished; /events pushes
the same as Server-Sent Events. DELETE cancels.

A poll with `after` costs what is new: the chunks after the cursor, without the whole text. A
queued task's view says where it stands in the queue (`queue_position`, `estimated_start_s`), and
its event stream says so again whenever that changes.
"""

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query
from pydantic import AfterValidator
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import ServicesDep
from app.errors import task_not_found
from app.queue import places, queue_place
from app.security import CallerTag, VisibleTaskId
from app.streams import follow, hold_stream
from core.protocol import CancelAccepted, ErrorBody, StreamedChunk, TaskStatus, TaskView
from core.store import START_CURSOR, record_key

router = APIRouter(tags=["tasks"])

# A Redis stream id: two unsigned 64-bit numbers, in ASCII digits (`\d` would take any script's).
CURSOR_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"
MAX_ID_PART = 2**64 - 1


def _stream_id(cursor: str | None) -> str | None:
    """Redis refuses a part above 2^64 - 1, which 20 digits can hold: that is the client's 422."""
    if cursor is not None and any(int(part) > MAX_ID_PART for part in cursor.split("-")):
        raise ValueError(f"is not a cursor: each of its two numbers is at most {MAX_ID_PART}")
    return cursor


Cursor = Annotated[str, AfterValidator(_stream_id)]


@router.get("/task/{task_id}", response_model=TaskView, responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
def get_task(
    task_id: VisibleTaskId,
    services: ServicesDep,
    after: Annotated[
        Cursor | None,
        Query(pattern=CURSOR_PATTERN, description="A cursor from an earlier answer: what came since, no whole text."),
    ] = None,
) -> TaskView:
    view = services.store.view(task_id, after)
    if view is None:
        raise task_not_found(task_id)
    if view.status == TaskStatus.queued and (place := queue_place(services, task_id)) is not None:
        return view.model_copy(update=place.model_dump())
    return view


async def existing_task_id(task_id: VisibleTaskId, services: ServicesDep) -> str:
    """Checked before a stream starts, so an unknown id is a 404 rather than an empty stream."""
    if not await services.aredis.exists(record_key(task_id)):
        raise task_not_found(task_id)
    return task_id


async def stream_place(services: ServicesDep, caller: CallerTag) -> AsyncIterator[None]:
    """The stream's place among its key's open streams, held until the response has been sent."""
    give_back = await hold_stream(services, caller)
    try:
        yield
    finally:
        await give_back()


@router.get(
    "/task/{task_id}/events",
    response_class=EventSourceResponse,
    responses={404: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def task_events(
    task_id: Annotated[str, Depends(existing_task_id)],
    services: ServicesDep,
    _: Annotated[None, Depends(stream_place)],
    after: Annotated[Cursor, Query(pattern=CURSOR_PATTERN, description="Start after this cursor.")] = START_CURSOR,
    last_event_id: Annotated[
        Cursor | None,
        Header(pattern=CURSOR_PATTERN, description="Sent by EventSource when it reconnects; wins over `after`."),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """While the task waits, a `queued` event each time its place changes (`queue_position`,
    `estimated_start_s`); then each chunk as a `chunk` event whose `id` is its cursor, so an
    EventSource that reconnects resumes after the last one it saw; then one `result` event with
    the task's final view (close the EventSource on it, or it reconnects and is sent the result
    again). Pings keep it alive."""
    async for place in places(services, task_id):
        yield ServerSentEvent(event="queued", data=place.model_dump())
    async for entry in follow(services.aredis, task_id, last_event_id or after):
        if not entry.ended:
            chunk = StreamedChunk(text=entry.text or "", attempt=entry.attempt)
            yield ServerSentEvent(event="chunk", id=entry.cursor, data=chunk.model_dump())
            continue
        view = await anyio.to_thread.run_sync(services.store.view, task_id)
        if view is None:
            yield ServerSentEvent(event="error", data={"detail": task_not_found(task_id).detail})
        else:  # the whole text, without the chunks this stream has already sent
            result = view.model_copy(update={"chunks": [], "cursor": entry.cursor})
            yield ServerSentEvent(event="result", id=entry.cursor, data=result.model_dump(mode="json"))


@router.delete(
    "/task/{task_id}",
    status_code=202,
    response_model=CancelAccepted,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
def cancel_task(task_id: VisibleTaskId, services: ServicesDep) -> CancelAccepted:
    """A queued task is cancelled at once; a running one stops within a decoding step, keeping its text."""
    found = services.store.request_cancel(task_id)
    if found is None:
        raise task_not_found(task_id)
    if found.finished:
        raise HTTPException(status_code=409, detail=f"task {task_id!r} has already finished ({found})")
    return CancelAccepted(task_id=task_id, status=TaskStatus.cancelled if found == TaskStatus.queued else found)

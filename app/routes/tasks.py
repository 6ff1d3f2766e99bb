"""GET /task/{id}: progress, chunks after a cursor, and the result once finished. DELETE cancels."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.deps import ServicesDep
from app.errors import task_not_found
from app.security import VisibleTaskId
from core.protocol import CancelAccepted, ErrorBody, TaskStatus, TaskView
from core.store import START_CURSOR

router = APIRouter(tags=["tasks"])

CURSOR_PATTERN = r"^\d{1,20}-\d{1,20}$"


@router.get("/task/{task_id}", response_model=TaskView, responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
def get_task(
    task_id: VisibleTaskId,
    services: ServicesDep,
    after: Annotated[str, Query(pattern=CURSOR_PATTERN, description="A cursor from an earlier answer.")] = START_CURSOR,
) -> TaskView:
    view = services.store.view(task_id, after)
    if view is None:
        raise task_not_found(task_id)
    return view


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

"""GET /task/{id}: progress, chunks after a cursor, and the result once finished."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from app.deps import ServicesDep
from core.protocol import ErrorBody, TaskView
from core.store import START_CURSOR

router = APIRouter(tags=["tasks"])

CURSOR_PATTERN = r"^\d{1,20}-\d{1,20}$"


@router.get("/task/{task_id}", response_model=TaskView, responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
def get_task(
    task_id: Annotated[str, Path(max_length=64)],
    services: ServicesDep,
    after: Annotated[str, Query(pattern=CURSOR_PATTERN, description="A cursor from an earlier answer.")] = START_CURSOR,
) -> TaskView:
    view = services.store.view(task_id, after)
    if view is None:
        raise HTTPException(status_code=404, detail=f"no task with id {task_id!r} (never submitted, or expired)")
    return view

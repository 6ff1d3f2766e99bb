"""POST /generate: our own door onto the queue; the admission steps are shared with every other door."""

from fastapi import APIRouter, Request, status

from app.admission import admit
from app.deps import ServicesDep
from app.security import CallerTag
from core.protocol import ErrorBody, GenerateAccepted, GenerateRequest

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GenerateAccepted,
    responses={
        413: {"model": ErrorBody},
        422: {"description": "Invalid request"},
        429: {"model": ErrorBody, "description": "The queue is full; see Retry-After"},
        503: {"model": ErrorBody},
    },
)
def generate(body: GenerateRequest, request: Request, services: ServicesDep, caller: CallerTag) -> GenerateAccepted:
    task_id = admit(body, services, caller)
    return GenerateAccepted(task_id=task_id, status_url=str(request.url_for("get_task", task_id=task_id)))

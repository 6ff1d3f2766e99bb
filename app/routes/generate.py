"""POST /generate: validate, budget the prompt, record the task, enqueue it."""

import uuid

from fastapi import APIRouter, Request, status

from app.deps import ServicesDep
from app.errors import field_error
from app.limits import check_prompt_chars, check_queue_room
from app.security import CallerTag
from core.protocol import ErrorBody, GenerateAccepted, GenerateRequest
from prompts import PromptTooLong, build_prompt
from worker.celery_app import GENERATE_TASK

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
    settings = services.settings
    max_new_tokens = body.max_new_tokens or settings.default_max_new_tokens
    if max_new_tokens > settings.max_new_tokens_limit:
        raise field_error(
            "max_new_tokens", f"must be at most {settings.max_new_tokens_limit} on this server", "less_than_equal"
        )
    _check_batching_options(body, settings.worker_concurrency)
    check_prompt_chars(body, settings.max_prompt_chars)
    try:
        build_prompt(services.formatter, body, settings.default_system_prompt, services.context_window - max_new_tokens)
    except PromptTooLong as exc:
        raise field_error("messages" if body.messages else "prompt", str(exc)) from exc
    check_queue_room(services)
    task_id = str(uuid.uuid4())
    services.store.create(task_id, owner=caller)
    try:
        services.celery.send_task(GENERATE_TASK, args=[body.model_dump(mode="json")], task_id=task_id)
    except Exception:
        services.store.delete(task_id)
        raise
    return GenerateAccepted(task_id=task_id, status_url=str(request.url_for("get_task", task_id=task_id)))


def _check_batching_options(body: GenerateRequest, worker_concurrency: int) -> None:
    """Batched decoding (WORKER_CONCURRENCY > 1) shares one sampler and has no repetition penalty."""
    if worker_concurrency == 1:
        return
    if body.seed is not None:
        raise field_error("seed", "seeded sampling needs WORKER_CONCURRENCY=1 on this server (it batches requests)")
    if body.repetition_penalty not in (None, 1.0):
        raise field_error(
            "repetition_penalty", "repetition_penalty needs WORKER_CONCURRENCY=1 on this server (it batches requests)"
        )

"""POST /generate: validate, budget the prompt, record the task, enqueue it."""

import uuid

from fastapi import APIRouter, Request, status

from app.deps import ServicesDep
from app.errors import field_error
from core.protocol import ErrorBody, GenerateAccepted, GenerateRequest
from prompts import PromptTooLong, build_prompt
from worker.celery_app import GENERATE_TASK

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GenerateAccepted,
    responses={422: {"description": "Invalid request"}, 503: {"model": ErrorBody}},
)
def generate(body: GenerateRequest, request: Request, services: ServicesDep) -> GenerateAccepted:
    settings = services.settings
    max_new_tokens = body.max_new_tokens or settings.default_max_new_tokens
    if max_new_tokens > settings.max_new_tokens_limit:
        raise field_error(
            "max_new_tokens", f"must be at most {settings.max_new_tokens_limit} on this server", "less_than_equal"
        )
    try:
        build_prompt(services.formatter, body, settings.default_system_prompt, services.context_window - max_new_tokens)
    except PromptTooLong as exc:
        raise field_error("messages" if body.messages else "prompt", str(exc)) from exc
    task_id = str(uuid.uuid4())
    services.store.create(task_id)
    try:
        services.celery.send_task(GENERATE_TASK, args=[body.model_dump(mode="json")], task_id=task_id)
    except Exception:
        services.store.delete(task_id)
        raise
    return GenerateAccepted(task_id=task_id, status_url=str(request.url_for("get_task", task_id=task_id)))

"""What the API refuses to take on: oversized prompts (422) and more tasks than the queue may hold (429).

Each check runs before the expensive step it protects: the prompt limit before the prompt is
tokenized, the queue limit before a task is recorded. (Oversized bodies are FastAPI's own
`max_body_size`, set in app.main.)
"""

from fastapi import HTTPException
from kombu.transport.redis import PRIORITY_STEPS, Channel

from app.deps import Services
from app.errors import field_error
from core.protocol import GenerateRequest
from worker.celery_app import QUEUE

QUEUE_FULL_RETRY_AFTER_S = 5

# kombu's Redis transport keeps a queue as one list per priority step: the plain name for
# priority 0, then "<name>\x06\x16<step>" for the others.
QUEUE_KEYS = [QUEUE] + [f"{QUEUE}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


def check_prompt_chars(body: GenerateRequest, limit: int) -> None:
    """Counted in characters before tokenizing, so a huge prompt costs the API nothing to refuse."""
    field = "messages" if body.messages is not None else "prompt"
    chars = sum(len(message.content) for message in body.conversation()) + len(body.system_prompt or "")
    if chars > limit:
        raise field_error(
            field, f"{field} and system_prompt hold {chars} characters, above this server's limit of {limit}"
        )


def queued_tasks(services: Services) -> int:
    """Tasks waiting in the Celery queue; tasks a worker has taken are no longer counted."""
    pipe = services.redis.pipeline(transaction=False)
    for key in QUEUE_KEYS:
        pipe.llen(key)
    return sum(pipe.execute())


def check_queue_room(services: Services) -> None:
    """429 while the queue holds MAX_QUEUED_TASKS; concurrent requests may pass it by a few."""
    limit = services.settings.max_queued_tasks
    waiting = queued_tasks(services)
    if waiting >= limit:
        raise HTTPException(
            status_code=429,
            detail=f"the queue is full ({waiting} tasks waiting, limit {limit}); retry later",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )

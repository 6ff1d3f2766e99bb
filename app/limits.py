"""What the API refuses to take on: oversized prompts (422), options its live workers lack (422) and more
tasks than the queue may hold (429).

Each check runs before the expensive step it protects: the prompt limits before the prompt is
tokenized, the queue limit before a task is recorded. (Oversized bodies are FastAPI's own
`max_body_size`, set in app.main.)
"""

from fastapi import HTTPException
from kombu.transport.redis import PRIORITY_STEPS, Channel

from app.deps import Services
from app.errors import field_error
from core.heartbeats import WorkerState
from core.protocol import GenerateRequest
from worker.celery_app import QUEUE

QUEUE_FULL_RETRY_AFTER_S = 5

# kombu's Redis transport keeps a queue as one list per priority step: the plain name for
# priority 0, then "<name>\x06\x16<step>" for the others.
QUEUE_KEYS = [QUEUE] + [f"{QUEUE}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


def check_message_count(body: GenerateRequest, limit: int) -> None:
    """Each message costs template work however short it is, so their number is bounded on its own."""
    if body.messages is not None and len(body.messages) > limit:
        raise field_error("messages", f"holds {len(body.messages)} messages, above this server's limit of {limit}")


# A request option and the capability a worker's engine must report for it.
OPTION_CAPABILITIES = {"seed": "seed", "repetition_penalty": "repetition_penalty"}


def check_capabilities(body: GenerateRequest, workers: list[WorkerState]) -> None:
    """Refuse an option some live worker's engine cannot honour, since any of them may take the task
    (transformers batching has no per-request seed or repetition penalty). With no worker live,
    nothing is known, and the task waits for one."""
    used = {"seed": body.seed is not None, "repetition_penalty": body.repetition_penalty not in (None, 1.0)}
    for option, capability in OPTION_CAPABILITIES.items():
        lacking = [w for w in workers if used[option] and w.capabilities.get(capability) is False]
        if lacking:
            engine = lacking[0].capabilities.get("engine", "its")
            raise field_error(
                option, f"{option} is not supported by worker {lacking[0].name} ({engine} engine, "
                f"{lacking[0].slots} slots); WORKER_CONCURRENCY=1 or ENGINE=llamacpp supports it"
            )


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

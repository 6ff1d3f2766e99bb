"""What the API refuses to take on: oversized bodies (413), oversized prompts (422), a full queue (429).

Each check runs before the expensive step it protects: the body limit before the body is parsed,
the prompt limit before the prompt is tokenized, the queue limit before a task is recorded.
"""

from fastapi import HTTPException
from kombu.transport.redis import PRIORITY_STEPS, Channel
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import Services
from app.errors import field_error
from core.protocol import GenerateRequest
from worker.celery_app import QUEUE

QUEUE_FULL_RETRY_AFTER_S = 5

# kombu's Redis transport keeps a queue as one list per priority step: the plain name for
# priority 0, then "<name>\x06\x16<step>" for the others.
QUEUE_KEYS = [QUEUE] + [f"{QUEUE}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


class BodySizeLimit:
    """Answers 413 to a request body above `max_bytes`: at once by its Content-Length, and by
    counting bytes as they arrive, so that a chunked upload without Content-Length cannot pass."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await JSONResponse(status_code=413, content={"detail": self._detail()})(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        """Raises 413 from inside the handler's read, which FastAPI turns into the answer."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._detail())
            return message

        return counted

    def _detail(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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

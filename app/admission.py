"""Admitting a request: every check that can refuse it, then record the task and queue it.

One module that every route calls, so no route copies the order that matters: the cheap checks
(counts, characters, reserved text) before the prompt is tokenized, the queue's room before the
task is recorded, and the record before the message, so the API can tell unknown ids from
queued ones and a worker never meets a message without its record.
"""

import json
import logging
import secrets
import uuid

import anyio
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.deps import Services
from app.errors import ContextExceeded, field_error
from app.limits import (
    check_capabilities,
    check_token_ids,
    check_kept_bytes,
    check_message_count,
    check_prompt_chars,
    check_queue_room,
    check_rate,
)
from app.metrics import count_admitted
from core.heartbeats import Heartbeats
from core.protocol import GenerateRequest
from core.redis_client import REPLICA_WAIT_MS, replicated
from core.settings import Settings
from prompts import ChatFormatter, Prompt, PromptTooLong, build_prompt
from core.queue import BACKGROUND, INTERACTIVE, Priority, sender
from core.tenants import Tenant, tenant

log = logging.getLogger(__name__)


def admit(
    body: GenerateRequest, services: Services, caller: str | None, annotation: str | None = None,
    background: bool = False, task_id: str | None = None,
) -> str:
    """The new task's id once it is queued; raises the 4xx (or 503) that explains a refusal.

    `annotation` is kept with the task for the API family that admitted it (see TaskStore.create).
    `background` work waits behind interactive work (core.queue). `task_id` is the id to queue it
    under (a batch line's, the same whoever submits it), for a caller that has checked it is unused.
    """
    settings = services.settings
    who = tenant(settings, caller)
    check_rate(services, who)
    check_capabilities(body, Heartbeats(services.redis).live())
    body = _seeded(body.with_defaults(settings))
    max_new_tokens = body.max_new_tokens or settings.default_max_new_tokens
    if max_new_tokens > settings.max_new_tokens_limit:
        raise field_error(
            "max_new_tokens", f"must be at most {settings.max_new_tokens_limit} on this server", "less_than_equal"
        )
    prompt_of(body, services, max_new_tokens)
    check_queue_room(services, who)
    request = body.model_dump(mode="json")
    check_kept_bytes(services, who, len(json.dumps(request)) + len(annotation or ""))
    return _enqueue(request, services, caller, who, annotation, BACKGROUND if background else INTERACTIVE, task_id)


async def admit_all(
    requests: list[GenerateRequest], services: Services, caller: str | None, background: bool = False
) -> list[str]:
    """A task per request (an answer's choices, a batch's prompts), all checked by their caller first:
    a refusal midway cancels the tasks already queued, so that none runs for an answer refused."""
    task_ids: list[str] = []
    try:
        for body in requests:
            task_ids.append(await run_in_threadpool(admit, body, services, caller, None, background))
    except BaseException:
        for task_id in task_ids:
            services.store.request_cancel(task_id)
        raise
    return task_ids


# Tokenizing is CPU work in the API process: a few at a time, on threads of their own, so that a
# burst of large texts waits its turn instead of taking every thread the other routes run on.
TOKENIZING = anyio.CapacityLimiter(2)


def prompt_of(body: GenerateRequest, services: Services, max_new_tokens: int) -> Prompt:
    """The prompt a worker will give the model (older turns dropped to leave room for the answer), or the
    refusal that says why there is none."""
    settings = services.settings
    check_message_count(body, settings.max_messages)
    check_prompt_chars(body, settings.max_prompt_chars)
    check_reserved_text(body, services.formatter)
    check_token_ids(body, services.tokenizer.get_vocab_size(with_added_tokens=True))
    try:
        return build_prompt(
            services.formatter, body, settings.default_system_prompt, services.context_window - max_new_tokens
        )
    except PromptTooLong as exc:
        source = "messages" if body.messages else "prompt" if body.prompt else "prompt_ids"
        raise ContextExceeded(source, str(exc), exc.needed, exc.limit, services.context_window) from exc


async def input_tokens(body: GenerateRequest, services: Services) -> int:
    """How many tokens the request's prompt takes, as admitting it would build it (without queueing it)."""
    body = body.with_defaults(services.settings)
    max_new_tokens = body.max_new_tokens or services.settings.default_max_new_tokens
    prompt = await anyio.to_thread.run_sync(prompt_of, body, services, max_new_tokens, limiter=TOKENIZING)
    return len(prompt.input_ids)


def _seeded(body: GenerateRequest) -> GenerateRequest:
    """A constrained answer always has a seed: an engine whose grammar cannot start mid-answer (vLLM's)
    takes it up by generating it again from the prompt, and only the same seed makes the same answer."""
    if body.constrained and body.seed is None:
        return body.model_copy(update={"seed": secrets.randbelow(2**63)})
    return body


def internal_request(fields: dict[str, object]) -> GenerateRequest:
    """Another API family's request, mapped onto ours, validated as ours: a refusal is FastAPI's
    RequestValidationError naming our field, which each family answers in its own envelope."""
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def check_reserved_text(body: GenerateRequest, formatter: ChatFormatter) -> None:
    """Text that would forge the chat format's own structure (Llama-2's `[INST]`, `<<SYS>>`) is refused,
    as Meta's reference `chat_completion` refuses it, rather than passed on to fake a turn. A raw
    prompt has no chat format to forge: it is the model's input as the client wrote it."""
    if body.raw:
        return
    fields: list[tuple[tuple[str | int, ...], str | None]] = [
        (("prompt",), body.prompt),
        (("system_prompt",), body.system_prompt),
    ]
    fields += [(("messages", i, "content"), message.content) for i, message in enumerate(body.messages or [])]
    for loc, text in fields:
        if text and (found := formatter.reserved_in(text)):
            raise field_error(loc, f"{found!r} is part of this model's chat format and may not appear in a message")


def _enqueue(
    request: dict, services: Services, caller: str | None, who: Tenant, annotation: str | None, task_class: str,
    task_id: str | None = None,
) -> str:
    """Record, put in its lane (where the record outlives a long queue), then release what the free
    slots take; a failed enqueue leaves nothing behind.

    With REDIS_MIN_REPLICAS, the task is accepted only once that many replicas hold its record and
    its message, so a failover cannot lose it; else it is cancelled and the answer is a 503.
    """
    task_id = task_id or str(uuid.uuid4())
    services.store.create(task_id, owner=caller, annotation=annotation)
    try:
        services.lanes.enqueue(task_id, who, task_class, request)
    except Exception:
        services.store.delete(task_id)
        raise
    count_admitted(services, who.name)
    try:
        services.lanes.release(sender(services.celery), Priority.of(services.settings))
    except Exception:  # the task waits in its lane (or in `released`, to be sent again): it is accepted
        log.warning("task %s: not released at admission; a worker's next scan releases it", task_id, exc_info=True)
    wanted = services.settings.redis_min_replicas
    if wanted and not replicated(services.redis, wanted, REPLICA_WAIT_MS):
        # The cancel keeps a queued task from running, unless it too is lost with the primary.
        services.store.request_cancel(task_id)
        raise HTTPException(
            status_code=503,
            detail=f"the task did not reach {wanted} Redis replica(s) within {REPLICA_WAIT_MS} ms; try again shortly",
            headers={"Retry-After": "5"},
        )
    return task_id

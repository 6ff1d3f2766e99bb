"""What the API refuses to take on: oversized prompts (422), options its live workers lack (422), and
more than a key may ask (429): tasks waiting, requests a minute, bytes kept.

Each check runs before the expensive step it protects: the prompt limits before the prompt is
tokenized, the key's limits before a task is recorded. (Oversized bodies are FastAPI's own
`max_body_size`, set in app.main.)
"""

import math
import time
import uuid

from fastapi import HTTPException

from app.deps import Services
from app.errors import field_error
from core.heartbeats import WorkerState
from core.protocol import GenerateRequest
from core.tenants import SHARED, Tenant

QUEUE_FULL_RETRY_AFTER_S = 5
# Requests per minute are counted in fixed windows of a minute, one key per tenant and minute.
RATE_WINDOW_S = 60


def check_message_count(body: GenerateRequest, limit: int) -> None:
    """Each message costs template work however short it is, so their number is bounded on its own."""
    if body.messages is not None and len(body.messages) > limit:
        raise field_error("messages", f"holds {len(body.messages)} messages, above this server's limit of {limit}")


# A request option and the capability a worker's engine must report for it.
OPTION_CAPABILITIES = {
    "seed": "seed", "repetition_penalty": "repetition_penalty", "json_schema": "grammar", "grammar": "grammar",
    "logprobs": "logprobs", "presence_penalty": "penalties", "frequency_penalty": "penalties",
    "logit_bias": "penalties",
}


def check_capabilities(body: GenerateRequest, workers: list[WorkerState]) -> None:
    """Refuse an option some live worker's engine cannot honour, since any of them may take the task
    (transformers batching has no per-request seed). With no worker live,
    nothing is known, and the task waits for one."""
    used = {
        "seed": body.seed is not None,
        "repetition_penalty": body.repetition_penalty not in (None, 1.0),
        "json_schema": body.json_schema is not None,
        "grammar": body.grammar is not None,
        "logprobs": body.logprobs is not None,
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "logit_bias": bool(body.logit_bias),
    }
    for option, capability in OPTION_CAPABILITIES.items():
        lacking = [w for w in workers if used[option] and w.capabilities.get(capability) is False]
        if lacking:
            engine = lacking[0].capabilities.get("engine", "its")
            raise field_error(
                option, f"{option} is not supported by worker {lacking[0].name} ({engine} engine, "
                f"{lacking[0].slots} slots); WORKER_CONCURRENCY=1 or ENGINE=llamacpp supports it"
            )


def check_token_ids(body: GenerateRequest, vocabulary: int) -> None:
    """An id outside the vocabulary (in logit_bias or the prompt) would fail the task in the engine."""
    for field, ids in (("logit_bias", body.logit_bias), ("prompt_ids", body.prompt_ids or ())):
        if unknown := [token_id for token_id in ids if not 0 <= token_id < vocabulary]:
            raise field_error(field, f"token id {unknown[0]} is not in the vocabulary (0 to {vocabulary - 1})")


def check_prompt_chars(body: GenerateRequest, limit: int) -> None:
    """Counted in characters before tokenizing, so a huge prompt costs the API nothing to refuse."""
    field = "messages" if body.messages is not None else "prompt"
    chars = sum(len(message.content) for message in body.conversation()) + len(body.system_prompt or "")
    if chars > limit:
        raise field_error(
            field, f"{field} and system_prompt hold {chars} characters, above this server's limit of {limit}"
        )


def check_queue_room(services: Services, who: Tenant) -> None:
    """429 while the tenant has MAX_QUEUED_TASKS waiting; concurrent requests may pass it by a few.
    Another tenant's backlog never counts against this one."""
    waiting = services.lanes.counts(who.name).waiting
    if waiting >= who.max_queued_tasks:
        whose = "" if who.name == SHARED else f" for key {who.name!r}"
        raise too_many(f"the queue is full ({waiting} tasks waiting, limit {who.max_queued_tasks}){whose}; "
                       "retry later", QUEUE_FULL_RETRY_AFTER_S)


def check_rate(services: Services, who: Tenant) -> None:
    """429 once the tenant has sent REQUESTS_PER_MINUTE generation requests this minute."""
    if not who.requests_per_minute:
        return
    now = time.time()
    window = int(now // RATE_WINDOW_S)
    key = f"limits:rate:{who.name}:{window}"
    pipe = services.redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 2 * RATE_WINDOW_S)
    sent, _ = pipe.execute()
    if sent > who.requests_per_minute:
        retry_after = math.ceil((window + 1) * RATE_WINDOW_S - now)
        raise too_many(f"key {who.name!r} has sent {who.requests_per_minute} requests this minute, its limit; "
                       f"retry in {retry_after} s", retry_after)


# KEYS: the tenant's kept records (ZSET "<id>:<bytes>" -> admitted at, ms), their total. ARGV: now
# (ms), the window (ms), this record's bytes, the budget, its member. Drops what left the window
# (up to 256 at a time), then adds the record if the total stays within the budget. Returns
# {1} when added, else {0, when the oldest record leaves the window (ms)}.
_KEEP_LUA = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, 256)) do
  redis.call('DECRBY', KEYS[2], tonumber(string.match(member, ':(%d+)$')))
  redis.call('ZREM', KEYS[1], member)
end
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if total + tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, oldest[2] and (tonumber(oldest[2]) + window) or now}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('INCRBY', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
return {1}
"""


def check_kept_bytes(services: Services, who: Tenant, size: int) -> None:
    """429 when the records the key had kept within RESULT_TTL_S (what it sent: its requests and
    what its family keeps with them, such as a response's metadata) would pass MAX_KEPT_BYTES."""
    now_ms, window_ms = int(time.time() * 1000), services.settings.result_ttl_s * 1000
    keys = [f"limits:kept:{who.name}", f"limits:kept_total:{who.name}"]
    member = f"{uuid.uuid4().hex}:{size}"
    found = services.redis.eval(_KEEP_LUA, 2, *keys, now_ms, window_ms, size, who.max_kept_bytes, member)
    if not found[0]:
        retry_after = max(1, math.ceil((int(found[1]) - now_ms) / 1000))
        raise too_many(f"key {who.name!r} keeps {who.max_kept_bytes} bytes of records within "
                       f"{services.settings.result_ttl_s} s, its limit; retry in {retry_after} s", retry_after)


def too_many(detail: str, retry_after_s: int) -> HTTPException:
    return HTTPException(status_code=429, detail=detail, headers={"Retry-After": str(retry_after_s)})

"""The task store in Redis, shared by the API (writes the record, reads progress) and the worker.

Per task: a hash `task:{id}` (status, attempt, lease holder, timestamps, result or error) and a
stream `task:{id}:chunks` of text chunks, each with the token ids it came from and the attempt
that wrote it, closed by an `end` entry once the task has ended. Celery's own result backend is
not used: it reports PENDING for ids it never saw and `update_state` overwrites, which would
drop chunks. Stream entry ids are the cursors, so any number of pollers read from wherever they
are. Both keys expire `result_ttl_s` after the last write, except that a queued task's record
does not expire while it waits in its lane, however long the backlog.

Leases: a running task is held by one attempt, whose worker renews the lease (a deadline in the
sorted set `tasks:leases`, on Redis's clock) every few seconds. Only the holder may write: a
worker that was frozen or cut off, and whose lease another worker has reclaimed, has its chunks
and result dropped and learns that it was superseded. A delivery of a task that is held is a
duplicate and is not run. The chunks stay when a lease changes hands: the next attempt feeds the
published tokens after the prompt and goes on, so the text and cursors a reader has seen stay
valid.

Beside them: the queue's lanes (`core.queue`), which the scripts that start and end a task
keep in step, the last few generation times (a queued task's expected wait), and
the fleet's metrics (`core.metrics`), which a task's end adds to in the same script that ends it.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from core import metrics
from core.queue import LEAVE_LUA, RELEASED_KEY
from core.protocol import NOT_COMPLETED, SUPERSEDED, Chunk, GenerationResult, TaskStatus, TaskView
from core.redis_client import RETRY_INTERVAL_S, transient_script_error

START_CURSOR = "0-0"
LEASES_KEY = "tasks:leases"
# How long a reclaimer has to send a lapsed task on before another may reclaim it again.
RESEND_AFTER_MS = 30_000
# How long the last few answers took to generate: what a queued task's expected wait is made of.
RECENT_KEY = "tasks:recent_generation_s"
RECENT = 50
# Where a cancel is announced, so that the worker running the task hears of it at once.
CANCELS_CHANNEL = "tasks:cancels"
# A record whose message was never sent (the API died in between) expires after this.
UNSENT_TTL_S = 600

# Redis's own clock in milliseconds: every lease deadline is set and read on it, so the workers'
# clocks need not agree.
_NOW_MS = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: record, leases, metrics, released. ARGV: task id, ttl, lease ms, started_at, the metrics
# field that counts takeovers, then field/value pairs. Starts an attempt when the task is queued,
# or running with nobody holding it (its lease was reclaimed or handed back): takes it out of
# `released` (core.queue), counts the attempt up, makes it the holder and grants its lease, in one step, so
# two deliveries that start at once cannot both hold the task. Returns {status found, attempt,
# attempts handed back, first started_at}; 'held' as the status when another attempt holds a live
# lease (the delivery is a duplicate).
_START_LUA = _NOW_MS + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status ~= 'queued' and status ~= 'running' then return {status, 0, 0, '0'} end
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= '0' then return {'held', tonumber(holder), 0, '0'} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('ZREM', KEYS[4], ARGV[1])
if attempt > 1 then redis.call('HINCRBYFLOAT', KEYS[3], ARGV[5], 1) end
redis.call('HSET', KEYS[1], 'holder', attempt, unpack(ARGV, 6))
redis.call('HSETNX', KEYS[1], 'first_started_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[1])
local handed_back = tonumber(redis.call('HGET', KEYS[1], 'handed_back') or '0')
return {status, attempt, handed_back, redis.call('HGET', KEYS[1], 'first_started_at')}
"""

# KEYS: record, chunks, leases, metrics, released. ARGV: task id, allowed statuses (comma-separated), ttl,
# the attempt that must hold the task ('' for any, '0' for nobody), the number n of metrics
# increments that follow as (field, amount) pairs, then field/value pairs. Applies the fields
# only if the current status is allowed and the holder matches; a status that ends the task also
# drops its lease, its place in the queue (core.queue) and its stored request, adds the increments (so an ended task is counted once),
# and ends its stream with an `end` entry, so readers blocked on the stream learn of it at once.
# Returns the status found, or 'superseded' when the holder did not match.
_TRANSITION_LUA = LEAVE_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if not string.find(',' .. ARGV[2] .. ',', ',' .. status .. ',', 1, true) then return status end
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'holder') or '0') ~= ARGV[4] then return 'superseded' end
local fields_from = 6 + 2 * tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, fields_from))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local now = redis.call('HGET', KEYS[1], 'status')
if now == 'succeeded' or now == 'failed' or now == 'cancelled' then
  for i = 6, fields_from - 1, 2 do redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], 'holder', '0')
  redis.call('HDEL', KEYS[1], 'request')
  redis.call('ZREM', KEYS[3], ARGV[1])
  leave_queue(KEYS[1], KEYS[5], ARGV[1])
  redis.call('XADD', KEYS[2], '*', 'end', now)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return status
"""

# KEYS: record, chunks. ARGV: attempt, ttl, text, token ids, the append's number within the attempt,
# the tokens' log probabilities as JSON ('' when not asked for).
# Appends only while that attempt holds the task, and answers why it must stop, if it must: the same
# call publishes and checks. A call that ran but whose reply was lost (Redis restarted, a dropped
# connection) is sent again by the worker's retry: the record keeps the last append's number, so
# the repeat writes nothing. Public: bench/redis_cost.py measures how many of these one Redis core
# serves.
APPEND_LUA = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 'superseded' end
local mark = ARGV[1] .. ':' .. ARGV[5]
if redis.call('HGET', KEYS[1], 'appended') ~= mark then
  if ARGV[6] == '' then
    redis.call('XADD', KEYS[2], '*', 'text', ARGV[3], 'tokens', ARGV[4], 'attempt', ARGV[1])
  else
    redis.call('XADD', KEYS[2], '*', 'text', ARGV[3], 'tokens', ARGV[4], 'attempt', ARGV[1], 'logprobs', ARGV[6])
  end
  redis.call('HSET', KEYS[1], 'appended', mark)
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'cancel_requested') == 1 then return 'cancelled' end
return false
"""

# KEYS: record. ARGV: attempt, prompt tokens. Notes the prompt's length only while that attempt
# holds the task: a plain HSET after the task was deleted (DELETE /v1/responses/{id} mid-answer)
# would bring back a record with no status.
_NOTE_PROMPT_LUA = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'prompt_tokens', ARGV[2])
return 1
"""

# KEYS: leases, then each held task's record. ARGV: lease ms, then task id and attempt per record.
# Extends each lease its attempt still holds; returns the ids of those it no longer holds.
_RENEW_LUA = _NOW_MS + """
local lost = {}
for i = 2, #KEYS do
  local id, attempt = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if redis.call('HGET', KEYS[i], 'holder') == attempt then
    redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), id)
  else
    table.insert(lost, id)
  end
end
return lost
"""

# KEYS: record, leases. ARGV: task id, attempt ('' for whoever holds it, once its lease has lapsed),
# whether to count it as a clean hand back (1) or not (0), and for a lapsed lease how long its
# reclaimer has to send it on (ms). Lets go of a running task: nobody holds it, so the next
# delivery starts it. Returns the stored request (to send that delivery), or false when there is
# nothing to let go of (another attempt holds it, it ended, or its lease is live). A lapsed task
# keeps a lease entry until its reclaimer says it sent it on (`_SENT_ON_LUA`): a reclaimer that
# dies in between leaves it to lapse again, to be reclaimed again, never stranded.
_RELEASE_LUA = _NOW_MS + """
local holder = redis.call('HGET', KEYS[1], 'holder')
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or not holder then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
if ARGV[2] == '' then
  local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if not deadline or tonumber(deadline) > now_ms then return false end
  redis.call('HSET', KEYS[1], 'holder', '0')
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[4]), ARGV[1])
  return redis.call('HGET', KEYS[1], 'request') or false
end
if holder ~= ARGV[2] then
  if holder == '0' then redis.call('ZREM', KEYS[2], ARGV[1]) end
  return false
end
redis.call('HSET', KEYS[1], 'holder', '0')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'handed_back', 1) end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HGET', KEYS[1], 'request') or false
"""

# KEYS: record, leases. ARGV: task id. A reclaimed task was sent on: its lease entry, kept until
# then in case the reclaimer died first, goes, unless an attempt has started and holds it.
_SENT_ON_LUA = """
if redis.call('HGET', KEYS[1], 'holder') == '0' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""

# KEYS: record, chunks. ARGV: where the range starts ('-', or '(<cursor>' for the entries after a
# cursor). Both in one read, so a view never pairs a record with chunks written after it; a script
# rather than MULTI, because Redis refuses a MULTI while it is out of memory and reading should go
# on then. The stored request stays behind: a poll has no use for the prompt.
_VIEW_LUA = """
local record = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= 'request' then
    table.insert(record, fields[i])
    table.insert(record, fields[i + 1])
  end
end
return {record, redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
"""


def record_key(task_id: str) -> str:
    """The task's record (a hash); with `chunks_key`, the only names the store gives a task."""
    return f"task:{task_id}"


def chunks_key(task_id: str) -> str:
    return f"task:{task_id}:chunks"


@dataclass(frozen=True)
class Started:
    """What `start` found. `attempt` 0 means do not run this delivery: `found` says why (None for an
    unknown or expired task, 'held' while another attempt holds it, else the status it ended with)."""

    attempt: int
    found: str | None
    handed_back: int = 0
    first_started_at: float = 0.0
    started_at: float = 0.0

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against MAX_ATTEMPTS: a stopping worker's clean hand back does not."""
        return self.attempt - self.handed_back


@dataclass(frozen=True)
class Published:
    """What earlier attempts of a task published: where a new attempt takes the answer up."""

    token_ids: list[int]
    text: str
    first_chunk_at: float | None  # on Redis's clock (the first entry's id), None before any chunk


class TaskStore:
    def __init__(
        self, client: redis.Redis, ttl_s: int, retry_s: float = 0, lease_s: float = 8.0, model: str = ""
    ) -> None:
        """`retry_s`: how long a script that meets a transient error (out of memory, READONLY) is
        retried, as the client itself retries plain commands; 0 raises at once (the API's 503).
        `lease_s`: how long a started or renewed lease lasts. `model`: the metrics' model label."""
        self.redis = client
        self.ttl_s = ttl_s
        self.model = model
        self.retry_s = retry_s
        self.lease_ms = round(lease_s * 1000)
        self._start_script = client.register_script(_START_LUA)
        self._transition_script = client.register_script(_TRANSITION_LUA)
        self._append_script = client.register_script(APPEND_LUA)
        self._note_prompt_script = client.register_script(_NOTE_PROMPT_LUA)
        self._renew_script = client.register_script(_RENEW_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._sent_on_script = client.register_script(_SENT_ON_LUA)
        self._view_script = client.register_script(_VIEW_LUA)

    def create(self, task_id: str, owner: str | None = None, annotation: str | None = None) -> None:
        """Record the task before it is queued, so that the API can tell unknown ids from queued ones.

        `owner` is a one-way tag of the API key that submitted it (never the key itself).
        `annotation` is what the API family that admitted the task needs to answer for it later
        (an OpenAI response's model name and settings): kept with the record, read by no worker.
        """
        fields: dict[str, object] = {"status": TaskStatus.queued, "enqueued_at": time.time()}
        if owner is not None:
            fields["owner"] = owner
        if annotation is not None:
            fields["annotation"] = annotation
        key = record_key(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, min(self.ttl_s, UNSENT_TTL_S))
        pipe.execute()

    def status(self, task_id: str) -> TaskStatus | None:
        """The task's status alone (a batch counting its lines reads no chunks); None for an unknown task."""
        value = self.redis.hget(record_key(task_id), "status")
        return TaskStatus(value.decode()) if value is not None else None

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """Many tasks' statuses in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(record_key(task_id), "status")
            return [TaskStatus(value.decode()) if value is not None else None for value in pipe.execute()]

    def owner(self, task_id: str) -> str | None:
        """The tag given to `create`; None for an unknown task or one created with none."""
        value = self.redis.hget(record_key(task_id), "owner")
        return value.decode() if value is not None else None

    def annotation(self, task_id: str) -> str | None:
        """The text given to `create`; None for an unknown task or one created with none."""
        value = self.redis.hget(record_key(task_id), "annotation")
        return value.decode() if value is not None else None

    def delete(self, task_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(record_key(task_id), chunks_key(task_id))
        pipe.zrem(LEASES_KEY, task_id)
        pipe.zrem(RELEASED_KEY, task_id)
        pipe.execute()

    def enqueued_at(self, task_id: str) -> float | None:
        value = self.redis.hget(record_key(task_id), "enqueued_at")
        return float(value) if value is not None else None

    def note_prompt(self, task_id: str, attempt: int, prompt_tokens: int) -> None:
        """How long the prompt is, known once a worker builds it: for timings read mid-answer."""
        self._eval(self._note_prompt_script, [record_key(task_id)], [attempt, prompt_tokens])

    def prompt_started(self, task_id: str) -> tuple[int, float] | None:
        """The prompt's tokens and when the task first started (worker clock), once both are known."""
        tokens, started = self.redis.hmget(record_key(task_id), "prompt_tokens", "first_started_at")
        return (int(tokens), float(started)) if tokens is not None and started is not None else None

    def start(self, task_id: str, worker: str, request: str) -> Started:
        """Hold the task under a new attempt with a fresh lease, unless another attempt holds it.

        `request` is the task's payload as it was sent: kept while the task runs, so whichever
        worker reclaims a lapsed lease can send the task on again.
        """
        now = time.time()
        fields = {"status": TaskStatus.running, "started_at": now, "worker": worker, "request": request}
        args: list[object] = [task_id, self.ttl_s, self.lease_ms, now, metrics.takeover(self.model)]
        for key, value in fields.items():
            args += [key, str(value)]
        found = self._eval(self._start_script, [record_key(task_id), LEASES_KEY, metrics.KEY, RELEASED_KEY], args)
        if not found:
            return Started(attempt=0, found=None)
        status, attempt, handed_back, first_started_at = found
        if status.decode() not in (TaskStatus.queued, TaskStatus.running):
            return Started(attempt=0, found=status.decode())
        return Started(attempt, status.decode(), handed_back, float(first_started_at), now)

    def published(self, task_id: str) -> Published:
        """The token ids and text of every chunk so far: what the attempt now holding the task goes on from.

        Read after `start`, once no earlier attempt can append any more.
        """
        entries = self.redis.xrange(chunks_key(task_id))
        token_ids: list[int] = []
        text = []
        for _, fields in entries:
            if b"text" in fields:
                token_ids += [int(t) for t in fields.get(b"tokens", b"").split()]
                text.append(fields[b"text"].decode())
        first = int(entries[0][0].split(b"-")[0]) / 1000 if entries else None
        return Published(token_ids, "".join(text), first)

    def logprobs(self, task_id: str) -> list[tuple[int, list]]:
        """Each token of the answer so far with its log probabilities (`[logprob, [[id, logprob], ...]]`,
        as the engine gave them), for an answer that asked for them: every attempt's chunks, in order."""
        tokens: list[tuple[int, list]] = []
        for _, fields in self.redis.xrange(chunks_key(task_id)):
            if b"logprobs" in fields:
                ids = [int(t) for t in fields.get(b"tokens", b"").split()]
                tokens += zip(ids, json.loads(fields[b"logprobs"]))
        return tokens

    def renew(self, held: dict[str, int]) -> list[str]:
        """Extend the lease of each task (id: attempt) this worker holds; returns those it no longer holds."""
        if not held:
            return []
        keys = [LEASES_KEY] + [record_key(task_id) for task_id in held]
        args: list[object] = [self.lease_ms]
        for task_id, attempt in held.items():
            args += [task_id, attempt]
        return [task_id.decode() for task_id in self._eval(self._renew_script, keys, args)]

    def release(self, task_id: str, attempt: int, clean: bool) -> str | None:
        """The holder lets go of the task: returns its request, to send again; None when the attempt
        no longer holds it. `clean` (its worker is stopping) is counted apart from other attempts,
        so that restarting workers never uses up a task's MAX_ATTEMPTS."""
        return self._release(task_id, str(attempt), clean)

    def reclaim_lapsed(self, task_id: str, send_within_ms: int = RESEND_AFTER_MS) -> str | None:
        """Take the task from a holder whose lease has lapsed (dead, frozen or cut off), so that
        another worker runs it: returns its request, to send again, and call `sent_on` once sent;
        None if its lease is live again, or someone else reclaimed it first. Not sent on within
        `send_within_ms` (its reclaimer died), it lapses again."""
        return self._release(task_id, "", clean=False, send_within_ms=send_within_ms)

    def sent_on(self, task_id: str) -> None:
        """The reclaimed task was sent on: stop watching its lease (unless an attempt holds it already)."""
        self._eval(self._sent_on_script, [record_key(task_id), LEASES_KEY], [task_id])

    def lapsed(self, limit: int = 16) -> list[str]:
        """Tasks whose lease deadline has passed on Redis's clock, the longest lapsed first."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(LEASES_KEY, 0, limit - 1, withscores=True)
        (seconds, micros), earliest = pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        return [task_id.decode() for task_id, deadline in earliest if deadline <= now_ms]

    def recent_generation_s(self) -> list[float]:
        """How long the last few answers took to generate, newest first."""
        return [float(value) for value in self.redis.lrange(RECENT_KEY, 0, -1)]

    def stop_reason(self, task_id: str, attempt: int) -> str | None:
        """Why this attempt must stop now: 'cancelled' by a client, or 'superseded' when it no longer
        holds the task. One round trip, asked only when no append has answered it lately."""
        cancel, holder = self.redis.hmget(record_key(task_id), ["cancel_requested", "holder"])
        if cancel is not None:
            return "cancelled"
        return SUPERSEDED if holder != str(attempt).encode() else None

    def request_cancel(self, task_id: str) -> TaskStatus | None:
        """Cancel a task nobody runs at once (queued, or between two workers); flag a held one for
        its worker. Returns the status found: None means no such task; a finished status means
        nothing was changed."""
        cancelled = {"status": TaskStatus.cancelled, "finish_reason": "cancelled"}
        counted = metrics.task_ended(self.model, TaskStatus.cancelled, "cancelled", None)
        before = self._transition(task_id, {TaskStatus.queued, TaskStatus.running}, cancelled, 0, counted)
        if before == SUPERSEDED:  # an attempt holds it: its worker stops at its next token
            before = self._transition(task_id, {TaskStatus.running}, {"cancel_requested": 1})
            self.redis.publish(CANCELS_CHANNEL, task_id)
        return TaskStatus(before) if before else None

    def append_chunk(
        self, task_id: str, attempt: int, number: int, text: str, token_ids: list[int],
        logprobs: Sequence[object] = (),
    ) -> str | None:
        """Append to the stream while `attempt` holds the task; `number` counts the attempt's appends
        (0, 1, ...), so that a retried call appends once. `logprobs`, one per token when the request
        asked for them, are kept as JSON beside the ids. Returns why it must stop, as `stop_reason`
        does: 'superseded' (nothing was appended) or 'cancelled' (it was)."""
        keys = [record_key(task_id), chunks_key(task_id)]
        tokens = " ".join(map(str, token_ids))
        scores = json.dumps(list(logprobs)) if logprobs else ""
        found = self._eval(self._append_script, keys, [attempt, self.ttl_s, text, tokens, number, scores])
        return found.decode() if found else None

    def finish(self, task_id: str, attempt: int, result: GenerationResult) -> bool:
        """Store the text and stats; a task that was stopped by a cancel ends `cancelled`.

        False when `attempt` no longer holds the task (another attempt's result is the one that counts).
        """
        status = TaskStatus.cancelled if result.finish_reason == "cancelled" else TaskStatus.succeeded
        fields = {"status": status, "result": result.model_dump_json()}
        counted = metrics.task_ended(self.model, status, result.finish_reason, result)
        found = self._transition(task_id, {TaskStatus.running}, fields, holder=attempt, counted=counted)
        if found != TaskStatus.running:
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(RECENT_KEY, result.timings.generation_s)
        pipe.ltrim(RECENT_KEY, 0, RECENT - 1)
        pipe.execute()
        return True

    def fail(self, task_id: str, error: str, attempt: int | None = None) -> None:
        """End the task `failed`, unless it has already ended or (given `attempt`) another attempt holds it."""
        fields = {"status": TaskStatus.failed, "error": error}
        counted = metrics.task_ended(self.model, TaskStatus.failed, None, None)
        self._transition(task_id, {TaskStatus.queued, TaskStatus.running}, fields, holder=attempt, counted=counted)

    def fail_unreadable(self, task_id: str, error: str) -> None:
        """End the task `failed` after Redis refused its writes for good (its stream key holds
        something that is not a stream): the stream goes, so that the record and its error can be
        read again."""
        self.redis.delete(chunks_key(task_id))
        self.fail(task_id, error)

    def view(self, task_id: str, after: str | None = None) -> TaskView | None:
        """One consistent snapshot of record and chunks; None for an id never submitted (or expired).

        With `after`, only the chunks after that cursor are read (an exclusive XRANGE) and no whole
        text is sent, so a poll costs what is new, however long the answer; without, the whole text.
        """
        start = "-" if after is None else f"({after}"
        keys = [record_key(task_id), chunks_key(task_id)]
        flat_record, raw_entries = self._eval(self._view_script, keys, [start])
        if not flat_record:
            return None
        record = dict(zip(flat_record[::2], flat_record[1::2]))
        entries = [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in raw_entries]
        return _to_view(task_id, record, entries, after)

    def _release(self, task_id: str, attempt: str, clean: bool, send_within_ms: int = 0) -> str | None:
        keys = [record_key(task_id), LEASES_KEY]
        found = self._eval(self._release_script, keys, [task_id, attempt, int(clean), send_within_ms])
        return found.decode() if found else None

    def _transition(
        self,
        task_id: str,
        allowed: set[TaskStatus],
        fields: dict[str, object],
        holder: int | None = None,
        counted: metrics.Increments | None = None,
    ) -> str | None:
        """Compare-and-set in one Lua call, so the API's cancel and the worker's writes cannot interleave.

        Returns the status found (the fields were applied if it is in `allowed`), SUPERSEDED when
        the task is not held by `holder` (0: by nobody), None for an unknown task. `counted` is
        added to the metrics if this transition ends the task.
        """
        args: list[object] = [task_id, ",".join(sorted(allowed)), self.ttl_s, "" if holder is None else holder]
        counted = counted or []
        args.append(len(counted))
        for name, amount in counted:
            args += [name, amount]
        for key, value in fields.items():
            args += [key, str(value)]
        keys = [record_key(task_id), chunks_key(task_id), LEASES_KEY, metrics.KEY, RELEASED_KEY]
        found = self._eval(self._transition_script, keys, args)
        return found.decode() if found else None

    def _eval(self, script: Script, keys: list[str], args: list[object]) -> object:
        """Run a script, retrying for `retry_s` the transient errors that Redis reports from inside
        scripts as plain ResponseErrors (which the client's own retry cannot recognise)."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return script(keys=keys, args=args)
            except redis.ResponseError as exc:
                transient = transient_script_error(exc)
                if transient is None:
                    raise
                if time.monotonic() >= deadline:
                    raise transient from exc
            time.sleep(RETRY_INTERVAL_S)


def _to_view(task_id: str, record: dict[bytes, bytes], entries: list, after: str | None) -> TaskView:
    fields = {k.decode(): v.decode() for k, v in record.items()}
    chunks = [
        Chunk(cursor=entry_id.decode(), text=data[b"text"].decode(), logprobs=_scored(data))
        for entry_id, data in entries if b"text" in data
    ]
    view: dict[str, object] = {
        "task_id": task_id,
        "status": fields["status"],
        "text": "".join(c.text for c in chunks) if after is None else None,
        "chunks": chunks,
        "cursor": chunks[-1].cursor if chunks else after or START_CURSOR,
        "worker": fields.get("worker"),
        "error": fields.get("error"),
        "finish_reason": fields.get("finish_reason"),
        "attempt": int(fields.get("attempt", 0)),
        "message": None if TaskStatus(fields["status"]).finished else NOT_COMPLETED,
    }
    if "result" in fields:
        result = json.loads(fields["result"])
        if after is not None:
            del result["text"]
        view |= result
    return TaskView.model_validate(view)


def _scored(fields: dict[bytes, bytes]) -> list[tuple[int, float | None, list]] | None:
    """A chunk's tokens with their log probabilities, for an answer that asked for them."""
    if b"logprobs" not in fields:
        return None
    ids = [int(t) for t in fields.get(b"tokens", b"").split()]
    return [(token_id, *(scored or (None, []))) for token_id, scored in zip(ids, json.loads(fields[b"logprobs"]))]

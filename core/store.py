"""The task store in Redis, shared by the API (writes the record, reads progress) and the worker.

Per task: a hash `task:{id}` (status, attempt, timestamps, result or error) and a stream
`task:{id}:chunks` of text chunks (each with its attempt), closed by an `end` entry once the
task has ended. Celery's own result backend is not used: it reports PENDING
for ids it never saw and `update_state` overwrites, which would drop chunks. Stream entry ids
are the cursors, so any number of pollers read from wherever they are. Both keys expire
`result_ttl_s` after the last write, except that a queued task's record does not expire while
its message waits in the queue, however long the backlog.

A worker's writes are fenced by its attempt number: a task delivered twice at once (a broker
connection blip can do that) has its stream restarted by the newer attempt, and the older one's
chunks and result are dropped, so no poller sees text from two attempts.
"""

import json
import time

import redis
from redis.commands.core import Script

from core.protocol import NOT_COMPLETED, Chunk, GenerationResult, TaskStatus, TaskView
from core.redis_client import RETRY_INTERVAL_S, transient_script_error

START_CURSOR = "0-0"


SUPERSEDED = "superseded"

# KEYS: record, chunks. ARGV: allowed statuses (comma-separated), ttl, new attempt (0/1), the
# attempt that must be current ('' for any), then field/value pairs. Applies the fields only if
# the current status is allowed and the attempt matches; a status that ends the task also ends
# its stream with an `end` entry, so readers blocked on the stream learn of it at once. Returns
# {status found, attempt after},
# with 'superseded' as the status when another attempt has taken the task over. The attempt
# comes back from the same script that counted it up, so two deliveries that start at once
# cannot both read the newer number.
_TRANSITION_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if not string.find(',' .. ARGV[1] .. ',', ',' .. status .. ',', 1, true) then return {status, attempt} end
if ARGV[4] ~= '' and tostring(attempt) ~= ARGV[4] then return {'superseded', attempt} end
if ARGV[3] == '1' then
  attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HINCRBY', KEYS[1], 'earlier_chunks', redis.call('XLEN', KEYS[2]))
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local now = redis.call('HGET', KEYS[1], 'status')
if now == 'succeeded' or now == 'failed' or now == 'cancelled' then
  redis.call('XADD', KEYS[2], '*', 'end', now)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return {status, attempt}
"""

# KEYS: record. Takes the expiry off a record that is still queued (one a worker has started
# keeps the expiry its start set).
_HOLD_LUA = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then return redis.call('PERSIST', KEYS[1]) end
return 0
"""

# KEYS: record, chunks. ARGV: where the range starts ('-', or '(<cursor>' for the entries after a
# cursor). Both in one read, so a view never pairs one attempt's record with another's chunks; a
# script rather than MULTI, because Redis refuses a MULTI while it is out of memory and reading
# should go on then.
_VIEW_LUA = """
return {redis.call('HGETALL', KEYS[1]), redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
"""

# A record whose message was never sent (the API died in between) expires after this.
UNSENT_TTL_S = 600

# KEYS: record, chunks. ARGV: attempt, ttl, text. Appends only while that attempt is current.
_APPEND_LUA = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'text', ARGV[3], 'attempt', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


def record_key(task_id: str) -> str:
    """The task's record (a hash); with `chunks_key`, the only names the store gives a task."""
    return f"task:{task_id}"


def chunks_key(task_id: str) -> str:
    return f"task:{task_id}:chunks"


class TaskStore:
    def __init__(self, client: redis.Redis, ttl_s: int, retry_s: float = 0) -> None:
        """`retry_s`: how long a script that meets a transient error (out of memory, READONLY) is
        retried, as the client itself retries plain commands; 0 raises at once (the API's 503)."""
        self.redis = client
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._transition_script = client.register_script(_TRANSITION_LUA)
        self._append_script = client.register_script(_APPEND_LUA)
        self._hold_script = client.register_script(_HOLD_LUA)
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

    def hold_while_queued(self, task_id: str) -> None:
        """Once the task's message is in the queue, its record stays as long as the message waits.

        A backlog longer than the TTL would otherwise expire the record of a task still queued,
        and the worker that finally takes it would find nothing to run. The worker's start (or a
        cancel) sets the expiry again.
        """
        self._eval(self._hold_script, [record_key(task_id)], [])

    def owner(self, task_id: str) -> str | None:
        """The tag given to `create`; None for an unknown task or one created with none."""
        value = self.redis.hget(record_key(task_id), "owner")
        return value.decode() if value is not None else None

    def annotation(self, task_id: str) -> str | None:
        """The text given to `create`; None for an unknown task or one created with none."""
        value = self.redis.hget(record_key(task_id), "annotation")
        return value.decode() if value is not None else None

    def stream_origin(self, task_id: str) -> tuple[int, int] | None:
        """The current attempt, and how many chunks earlier attempts published before a restart
        dropped them: a reader that numbers chunks across attempts starts this attempt's there, so
        its numbers never go back. None for an unknown task."""
        status, attempt, earlier = self.redis.hmget(record_key(task_id), ["status", "attempt", "earlier_chunks"])
        return (int(attempt or 0), int(earlier or 0)) if status is not None else None

    def delete(self, task_id: str) -> None:
        self.redis.delete(record_key(task_id), chunks_key(task_id))

    def enqueued_at(self, task_id: str) -> float | None:
        value = self.redis.hget(record_key(task_id), "enqueued_at")
        return float(value) if value is not None else None

    def start(self, task_id: str, worker: str) -> int:
        """Mark the task running and return its attempt number; 0 means do not run it (cancelled or expired).

        A task found `running` was delivered again after its worker died: the attempt number goes
        up and its chunk stream starts afresh, so no poller sees text from two attempts.
        """
        fields = {"status": TaskStatus.running, "started_at": time.time(), "worker": worker}
        before, attempt = self._transition(task_id, {TaskStatus.queued, TaskStatus.running}, fields, new_attempt=True)
        return attempt if before in (TaskStatus.queued, TaskStatus.running) else 0

    def stop_reason(self, task_id: str, attempt: int) -> str | None:
        """Why this attempt must stop now: 'cancelled' by a client, or 'superseded' by a newer attempt.

        One round trip, asked after every token.
        """
        cancel, current = self.redis.hmget(record_key(task_id), ["cancel_requested", "attempt"])
        if cancel is not None:
            return "cancelled"
        return SUPERSEDED if current != str(attempt).encode() else None

    def request_cancel(self, task_id: str) -> TaskStatus | None:
        """Cancel a queued task at once, or flag a running one for its worker; returns the status found.

        None means no such task; a finished status means nothing was changed.
        """
        cancelled = {"status": TaskStatus.cancelled, "finish_reason": "cancelled"}
        before, _ = self._transition(task_id, {TaskStatus.queued}, cancelled)
        if before == TaskStatus.running:
            before, _ = self._transition(task_id, {TaskStatus.running}, {"cancel_requested": 1})
        return TaskStatus(before) if before else None

    def append_chunk(self, task_id: str, attempt: int, text: str) -> bool:
        """Append to the stream while `attempt` is the task's current one; False when it no longer is."""
        keys = [record_key(task_id), chunks_key(task_id)]
        return bool(self._eval(self._append_script, keys, [attempt, self.ttl_s, text]))

    def finish(self, task_id: str, attempt: int, result: GenerationResult) -> bool:
        """Store the text and stats; a task that was stopped by a cancel ends `cancelled`.

        False when a newer attempt has taken the task over (its result is the one that counts).
        """
        status = TaskStatus.cancelled if result.finish_reason == "cancelled" else TaskStatus.succeeded
        fields = {"status": status, "result": result.model_dump_json()}
        return self._transition(task_id, {TaskStatus.running}, fields, attempt=attempt)[0] == TaskStatus.running

    def fail(self, task_id: str, error: str, attempt: int | None = None) -> None:
        """End the task `failed`, unless it has already ended or (given `attempt`) a newer attempt runs it."""
        fields = {"status": TaskStatus.failed, "error": error}
        self._transition(task_id, {TaskStatus.queued, TaskStatus.running}, fields, attempt=attempt)

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

    def _transition(
        self,
        task_id: str,
        allowed: set[TaskStatus],
        fields: dict[str, object],
        new_attempt: bool = False,
        attempt: int | None = None,
    ) -> tuple[str | None, int]:
        """Compare-and-set in one Lua call, so the API's cancel and the worker's start cannot interleave.

        Returns the status found (the fields were applied if it is in `allowed`), SUPERSEDED when
        `attempt` is no longer current, None for an unknown task; and the task's attempt number
        once the script has run (0 for an unknown task).
        """
        args: list[object] = [",".join(sorted(allowed)), self.ttl_s, int(new_attempt), attempt or ""]
        for key, value in fields.items():
            args += [key, str(value)]
        found = self._eval(self._transition_script, [record_key(task_id), chunks_key(task_id)], args)
        if not found:
            return None, 0
        status, current = found
        return status.decode(), int(current)

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
        Chunk(cursor=entry_id.decode(), text=data[b"text"].decode()) for entry_id, data in entries if b"text" in data
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

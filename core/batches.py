"""Batches in Redis (OpenAI's Batch API): each batch's record, its lines, and the tasks they became.

Per batch: a hash `batch:{id}` (its object: endpoint, input file, status and its timestamps,
counts, output and error files, errors, metadata, owner), a list `batch:{id}:lines` of the
validated lines (custom_id and body, as JSON), a hash `batch:{id}:tasks` from a line's index to
its task ids (lines are submitted in order; the record's `submitted` says how far), and a set
`batch:{id}:open` of the submitted lines not yet counted as ended, so a pass reads only those, however long
the file. Per owner, a sorted set `batches:index:{owner}` of ids in creation order. The set
`batches:active` holds the batches someone must still advance (app.openai.batches.driver).

Every change of status is one script that checks the status it changes from, so two API processes
advancing the same batch cannot both validate, end or finalize it: whoever moves it first does,
and the other sees it moved.
"""

import json
import time
import uuid
from dataclasses import dataclass, field

import redis

from core.redis_client import text

ANYONE = "*"
BATCH_ID_PREFIX = "batch_"
ACTIVE_KEY = "batches:active"
BY_STATUS_KEY = "batches:by_status"  # how many batches are in each status, for /metrics
SEQUENCE_KEY = "batches:sequence"

# OpenAI's statuses, and the timestamp each one sets.
STAMPS = {
    "in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
    "failed": "failed_at", "expired": "expired_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at",
}
ENDED = ("completed", "failed", "expired", "cancelled")

# KEYS: record, the batches by status. ARGV: the statuses it may move from (comma-separated), the new status,
# then field/value pairs. Returns 1 when it moved.
_MOVE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 0
end
local allowed = false
for from in string.gmatch(ARGV[1], '[^,]+') do
  if from == status then allowed = true end
end
if not allowed then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[2], status, -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""

# KEYS: record, tasks, open lines. ARGV: line index, its task ids (or its refusal), '1' when refused. Notes a
# line once: a refusal counts as failed at once, a submitted line joins the open ones.
_SUBMITTED_LUA = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'failed', 1) else redis.call('SADD', KEYS[3], ARGV[1]) end
end
local after = tonumber(ARGV[1]) + 1
if tonumber(redis.call('HGET', KEYS[1], 'submitted') or '0') < after then redis.call('HSET', KEYS[1], 'submitted', after) end
"""

# KEYS: record, open lines. ARGV: the count they end as (completed or failed), then line indices. Counts each
# line once, however many passes see it end.
_CLOSE_LUA = """
local ended = 0
for i = 2, #ARGV do ended = ended + redis.call('SREM', KEYS[2], ARGV[i]) end
if ended > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], ended) end
return ended
"""


@dataclass
class Batch:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, ... as they happen
    total: int = 0
    submitted: int = 0  # lines 0 to submitted - 1 are tasks (or refused)
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, object]] = field(default_factory=list)
    ending: str | None = None  # the status finalizing ends in: completed, cancelled or expired
    webhook: tuple[str, str] | None = None  # where its end is announced (target name, URL), fixed at creation


class BatchStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._move = client.register_script(_MOVE_LUA)
        self._submitted = client.register_script(_SUBMITTED_LUA)
        self._close = client.register_script(_CLOSE_LUA)

    def create(self, owner: str | None, endpoint: str, input_file_id: str, window_s: int, window: str,
               metadata: dict[str, str], webhook: tuple[str, str] | None) -> Batch:
        now = int(time.time())
        batch = Batch(
            id=BATCH_ID_PREFIX + uuid.uuid4().hex, owner=owner or ANYONE, endpoint=endpoint,
            input_file_id=input_file_id, completion_window=window, status="validating", created_at=now,
            expires_at=now + window_s, metadata=metadata, webhook=webhook,
        )
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(_record_key(batch.id), mapping=_fields(batch))
        pipe.zadd(_index_key(batch.owner), {batch.id: self._redis.incr(SEQUENCE_KEY)})
        pipe.sadd(ACTIVE_KEY, batch.id)
        pipe.hincrby(BY_STATUS_KEY, batch.status, 1)
        pipe.execute()
        return batch

    def get(self, batch_id: str, owner: str | None = ANYONE) -> Batch | None:
        """The batch, when it exists and `owner` may see it (None: any owner, for the driver)."""
        if not batch_id.startswith(BATCH_ID_PREFIX):
            return None
        record = self._redis.hgetall(_record_key(batch_id))
        if not record:
            return None
        batch = _batch({text(k): text(v) for k, v in record.items()})
        return batch if owner is None or batch.owner == (owner or ANYONE) else None

    def listed(self, owner: str | None) -> list[Batch]:
        """The owner's batches, oldest first."""
        with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in self._redis.zrange(_index_key(owner or ANYONE), 0, -1):
                pipe.hgetall(_record_key(text(batch_id)))
            records = pipe.execute()
        return [_batch({text(k): text(v) for k, v in record.items()}) for record in records if record]

    def by_status(self) -> dict[str, int]:
        return {text(k): int(v) for k, v in self._redis.hgetall(BY_STATUS_KEY).items()}

    def active(self) -> list[str]:
        return sorted(text(i) for i in self._redis.smembers(ACTIVE_KEY))

    def move(self, batch: Batch, frm: tuple[str, ...], to: str, **fields: object) -> bool:
        """Move the batch to status `to` from one of `frm` (stamping the time), with `fields`; False when
        it was not in one of them (someone else moved it first)."""
        update = {STAMPS[to]: int(time.time())} if to in STAMPS else {}
        update |= {key: _encode(value) for key, value in fields.items()}
        pairs = [item for pair in update.items() for item in pair]
        moved = bool(self._move(keys=[_record_key(batch.id), BY_STATUS_KEY], args=[",".join(frm), to, *pairs]))
        if moved and to in ENDED:
            self._redis.srem(ACTIVE_KEY, batch.id)
        return moved

    def note_ending(self, batch: Batch, ending: str) -> None:
        """The status the batch will end in, once what runs has ended (expired: its window has passed)."""
        self._redis.hset(_record_key(batch.id), "ending", ending)

    def add_lines(self, batch: Batch, lines: list[dict[str, object]]) -> None:
        """The validated lines, once (a second call, after a restart mid-way, starts them afresh)."""
        key = _lines_key(batch.id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        for start in range(0, len(lines), 1000):
            pipe.rpush(key, *[json.dumps(line) for line in lines[start : start + 1000]])
        pipe.execute()

    def line(self, batch: Batch, index: int) -> dict[str, object]:
        return json.loads(self._redis.lindex(_lines_key(batch.id), index))

    def lines(self, batch: Batch) -> list[dict[str, object]]:
        return [json.loads(line) for line in self._redis.lrange(_lines_key(batch.id), 0, -1)]

    def tasks(self, batch: Batch) -> dict[int, list[str]]:
        """Each submitted line's task ids, by line index."""
        return {int(k): text(v).split(",") for k, v in self._redis.hgetall(_tasks_key(batch.id)).items()}

    def open_lines(self, batch: Batch) -> dict[int, list[str]]:
        """The task ids of each line submitted and not yet counted as ended."""
        indices = sorted(int(i) for i in self._redis.smembers(_open_key(batch.id)))
        found = self._redis.hmget(_tasks_key(batch.id), [str(i) for i in indices]) if indices else []
        return {index: text(ids).split(",") for index, ids in zip(indices, found) if ids is not None}

    def note_tasks(self, batch: Batch, index: int, task_ids: list[str], refused: bool = False) -> None:
        """Line `index` became these tasks (or, `refused`, its one entry says why not)."""
        self._submitted(keys=[_record_key(batch.id), _tasks_key(batch.id), _open_key(batch.id)],
                        args=[index, ",".join(task_ids), "1" if refused else "0"])

    def close_lines(self, batch: Batch, completed: list[int], failed: list[int]) -> None:
        """Count these open lines as ended, each once."""
        for count, indices in (("completed", completed), ("failed", failed)):
            if indices:
                self._close(keys=[_record_key(batch.id), _open_key(batch.id)], args=[count, *indices])

    def forget_lines(self, batch: Batch) -> None:
        """Once it has ended, the lines and their task ids are in its files."""
        self._redis.delete(_lines_key(batch.id), _tasks_key(batch.id), _open_key(batch.id))


def line_task_ids(batch_id: str, index: int, choices: int) -> list[str]:
    """A line's task ids, the same whoever submits it: a submission cut short by a restart is found
    again, and a line never runs twice."""
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"batch/{batch_id}/{index}/{choice}")) for choice in range(choices)]


def _record_key(batch_id: str) -> str:
    return f"batch:{batch_id}"


def _lines_key(batch_id: str) -> str:
    return f"batch:{batch_id}:lines"


def _tasks_key(batch_id: str) -> str:
    return f"batch:{batch_id}:tasks"


def _open_key(batch_id: str) -> str:
    return f"batch:{batch_id}:open"


def _index_key(owner: str) -> str:
    return f"batches:index:{owner}"


def _encode(value: object) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _fields(batch: Batch) -> dict[str, str]:
    fields = {
        "id": batch.id, "owner": batch.owner, "endpoint": batch.endpoint, "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window, "status": batch.status, "created_at": batch.created_at,
        "expires_at": batch.expires_at, "metadata": batch.metadata, "total": batch.total,
        "submitted": batch.submitted, "completed": batch.completed, "failed": batch.failed,
    }
    if batch.webhook is not None:
        fields["webhook"] = list(batch.webhook)
    return {key: _encode(value) for key, value in fields.items()}


def _batch(fields: dict[str, str]) -> Batch:
    return Batch(
        id=fields["id"], owner=fields["owner"], endpoint=fields["endpoint"], input_file_id=fields["input_file_id"],
        completion_window=fields["completion_window"], status=fields["status"],
        created_at=int(fields["created_at"]), expires_at=int(fields["expires_at"]),
        metadata=json.loads(fields.get("metadata", "{}")),
        stamps={stamp: int(fields[stamp]) for stamp in STAMPS.values() if stamp in fields},
        total=int(fields.get("total", 0)), submitted=int(fields.get("submitted", 0)),
        completed=int(fields.get("completed", 0)),
        failed=int(fields.get("failed", 0)), output_file_id=fields.get("output_file_id"),
        error_file_id=fields.get("error_file_id"), errors=json.loads(fields.get("errors", "[]")),
        ending=fields.get("ending"),
        webhook=tuple(json.loads(fields["webhook"])) if "webhook" in fields else None,  # type: ignore[arg-type]
    )

"""The task store in Redis, shared by the API (writes the record, reads progress) and the worker.

Per task: a hash `task:{id}` (status, timestamps, result or error) and a stream
`task:{id}:chunks` of text chunks. Celery's own result backend is not used: it reports PENDING
for ids it never saw and `update_state` overwrites, which would drop chunks. Stream entry ids
are the cursors, so any number of pollers read from wherever they are. Both keys expire
`result_ttl_s` after the last write.
"""

import json
import time

import redis

from core.protocol import Chunk, GenerationResult, TaskStatus, TaskView

START_CURSOR = "0-0"


def _record_key(task_id: str) -> str:
    return f"task:{task_id}"


def _chunks_key(task_id: str) -> str:
    return f"task:{task_id}:chunks"


class TaskStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def create(self, task_id: str) -> None:
        """Record the task before it is queued, so that the API can tell unknown ids from queued ones."""
        self._write(task_id, {"status": TaskStatus.queued, "enqueued_at": time.time()})

    def delete(self, task_id: str) -> None:
        self.redis.delete(_record_key(task_id), _chunks_key(task_id))

    def enqueued_at(self, task_id: str) -> float | None:
        value = self.redis.hget(_record_key(task_id), "enqueued_at")
        return float(value) if value is not None else None

    def mark_running(self, task_id: str, worker: str) -> None:
        self._write(task_id, {"status": TaskStatus.running, "started_at": time.time(), "worker": worker})

    def append_chunk(self, task_id: str, text: str) -> None:
        key = _chunks_key(task_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, {"text": text})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def succeed(self, task_id: str, result: GenerationResult) -> None:
        self._write(task_id, {"status": TaskStatus.succeeded, "result": result.model_dump_json()})

    def fail(self, task_id: str, error: str) -> None:
        self._write(task_id, {"status": TaskStatus.failed, "error": error})

    def view(self, task_id: str, after: str = START_CURSOR) -> TaskView | None:
        """One consistent snapshot of record and chunks; None for an id never submitted (or expired)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(_record_key(task_id))
        pipe.xrange(_chunks_key(task_id))
        record, entries = pipe.execute()
        if not record:
            return None
        return _to_view(task_id, record, entries, after)

    def _write(self, task_id: str, fields: dict[str, object]) -> None:
        key = _record_key(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, self.ttl_s)
        pipe.expire(_chunks_key(task_id), self.ttl_s)
        pipe.execute()


def _to_view(task_id: str, record: dict[bytes, bytes], entries: list, after: str) -> TaskView:
    fields = {k.decode(): v.decode() for k, v in record.items()}
    chunks = [Chunk(cursor=entry_id.decode(), text=data[b"text"].decode()) for entry_id, data in entries]
    later = [c for c in chunks if _cursor_key(c.cursor) > _cursor_key(after)]
    view: dict[str, object] = {
        "task_id": task_id,
        "status": fields["status"],
        "text": "".join(c.text for c in chunks),
        "chunks": later,
        "cursor": chunks[-1].cursor if chunks else START_CURSOR,
        "worker": fields.get("worker"),
        "error": fields.get("error"),
    }
    if "result" in fields:
        view |= json.loads(fields["result"])
    return TaskView.model_validate(view)


def _cursor_key(cursor: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)

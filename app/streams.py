"""One way to follow a task's stream as it grows, for every route that pushes text to a client.

A blocking XREAD on the asyncio client waits for the worker's next chunk, so an idle stream
costs one blocked read and no thread, and a chunk reaches the reader as soon as it is written.
The store closes each task's stream with an `end` entry in the same script that ends the task,
so the reader needs no polling of the record to learn that it is over; it looks at the record
only when a long wait brings nothing (a record that expired, or ended before streams had ends).
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio

from core.protocol import TaskStatus
from core.store import START_CURSOR, chunks_key, record_key

BLOCK_MS = 15_000
BATCH = 256


@dataclass(frozen=True)
class StreamEntry:
    """A chunk (`text`, and the attempt that wrote it), or the stream's end (`text` None)."""

    cursor: str
    text: str | None
    attempt: int = 0

    @property
    def ended(self) -> bool:
        return self.text is None


async def follow(client: redis.asyncio.Redis, task_id: str, after: str = START_CURSOR) -> AsyncIterator[StreamEntry]:
    """The entries after `after`, as they are written, ending with the end entry (or at once, with
    none, for a task whose record is gone)."""
    cursor = after
    block: int | None = None  # the first read takes what is there and returns: a reader that
    while True:  # comes back after the end (EventSource reconnects by itself) hears of it at once
        reply = await client.xread({chunks_key(task_id): cursor}, count=BATCH, block=block)
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            if b"end" in fields:
                yield StreamEntry(cursor=cursor, text=None)
                return
            yield StreamEntry(cursor=cursor, text=fields[b"text"].decode(), attempt=int(fields.get(b"attempt", 0)))
        if not entries and await _over(client, task_id):
            yield StreamEntry(cursor=cursor, text=None)
            return
        block = BLOCK_MS


async def _over(client: redis.asyncio.Redis, task_id: str) -> bool:
    status = await client.hget(record_key(task_id), "status")
    return status is None or TaskStatus(status.decode()).finished

"""One way to follow a task's stream as it grows, for every route that pushes text to a client.

A blocking XREAD on the asyncio client waits for the worker's next chunk, so an idle stream
costs one blocked read and no thread, and a chunk reaches the reader as soon as it is written.
The store closes each task's stream with an `end` entry in the same script that ends the task,
so the reader needs no polling of the record to learn that it is over; it looks at the record
only when a long wait brings nothing (a record that expired, or ended before streams had ends).
A Redis restart pauses a reader rather than ending it: it reads on from its cursor once Redis
is back, for up to OUTAGE_S.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import redis
import redis.asyncio

from app.deps import Services
from app.limits import too_many
from core.protocol import TaskStatus, TaskView
from core.redis_client import RETRY_INTERVAL_S, TRANSIENT_ERRORS
from core.store import START_CURSOR, chunks_key, record_key
from core.tenants import tenant

T = TypeVar("T")

BLOCK_MS = 15_000
BATCH = 256
DISCONNECT_CHECK_S = 0.25
OUTAGE_S = 30.0
# The status of an answer to a client that left before it (nginx's code): nobody reads it.
CLIENT_GONE = 499
STREAM_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class StreamEntry:
    """A chunk (`text`, and the attempt that wrote it), or the stream's end (`text` None)."""

    cursor: str
    text: str | None
    attempt: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)  # one per token, when the request asked for them

    @property
    def ended(self) -> bool:
        return self.text is None


async def follow(client: redis.asyncio.Redis, task_id: str, after: str = START_CURSOR) -> AsyncIterator[StreamEntry]:
    """The entries after `after`, as they are written, ending with the end entry (or at once, with
    none, for a task whose record is gone)."""
    cursor = after
    block: int | None = None  # the first read takes what is there and returns: a reader that
    while True:  # comes back after the end (EventSource reconnects by itself) hears of it at once
        reply = await _riding_out(lambda: client.xread({chunks_key(task_id): cursor}, count=BATCH, block=block))
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            if b"end" in fields:
                yield StreamEntry(cursor=cursor, text=None)
                return
            yield StreamEntry(
                cursor=cursor, text=fields[b"text"].decode(), attempt=int(fields.get(b"attempt", 0)),
                token_ids=[int(t) for t in fields.get(b"tokens", b"").split()],
                logprobs=json.loads(fields[b"logprobs"]) if b"logprobs" in fields else [],
            )
        if not entries and await _riding_out(lambda: _over(client, task_id)):
            yield StreamEntry(cursor=cursor, text=None)
            return
        block = BLOCK_MS


async def _riding_out(read: Callable[[], Awaitable[T]]) -> T:
    """`read()`, again every RETRY_INTERVAL_S while Redis is restarting, for up to OUTAGE_S."""
    deadline = time.monotonic() + OUTAGE_S
    while True:
        try:
            return await read()
        except TRANSIENT_ERRORS:
            if time.monotonic() > deadline:
                raise
        await anyio.sleep(RETRY_INTERVAL_S)


async def _over(client: redis.asyncio.Redis, task_id: str) -> bool:
    status = await client.hget(record_key(task_id), "status")
    return status is None or TaskStatus(status.decode()).finished


# A key's open streams: a sorted set of one entry per stream, scored by when it lapses, so that
# the entries of an API process that died leave the count by themselves.
STREAMS_KEY = "limits:streams:{}"
STREAM_ENTRY_S = 900
# KEYS: the key's streams. ARGV: entry, limit, now (ms), lapse (ms). 1 if the entry was added.
_HOLD_STREAM_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


async def hold_stream(services: Services, caller: str | None) -> "OnClose":
    """Count one more open stream against the caller's key, or 429 at its MAX_STREAMS; returns what
    gives the place back, to be awaited when the stream ends. (An entry outlives a stream whose
    API process died by STREAM_ENTRY_S at most.)"""
    who = tenant(services.settings, caller)
    key, entry = STREAMS_KEY.format(who.name), uuid.uuid4().hex
    held = await services.aredis.eval(
        _HOLD_STREAM_LUA, 1, key, entry, who.max_streams, int(time.time() * 1000), STREAM_ENTRY_S * 1000
    )
    if not held:
        raise too_many(f"key {who.name!r} holds {who.max_streams} open streams, its limit; close one first",
                       STREAM_RETRY_AFTER_S)

    async def give_back() -> None:
        with anyio.CancelScope(shield=True):
            try:
                await services.aredis.zrem(key, entry)
            except redis.RedisError:  # Redis away: the entry lapses by itself
                pass

    return give_back


OnClose = Callable[[], Awaitable[None]]


async def admit_streaming(
    services: Services, caller: str | None, stream: bool, admit: Callable[[], Awaitable[T]]
) -> tuple[T, OnClose | None]:
    """`admit()`, and for a stream its place among the key's open streams, taken first, so that a
    key at its MAX_STREAMS is refused before any task is queued for it; with what gives it back."""
    if not stream:
        return await admit(), None
    give_back = await hold_stream(services, caller)
    try:
        return await admit(), give_back
    except BaseException:
        await give_back()
        raise


class StreamBroken(Exception):
    """The answer cannot go on in this stream: the task failed or expired."""


async def chunks_then_result(services: Services, task_id: str) -> AsyncIterator[StreamEntry | TaskView]:
    """Each chunk as it comes, then the task's final view: for the routes that stream an answer.

    A worker that dies or stops mid-answer changes nothing here: the attempt that takes the task
    over goes on after the last chunk. A client that goes away before the end (the iteration is
    abandoned) cancels the task, so the model is freed at once.
    """
    try:
        async for entry in follow(services.aredis, task_id):
            if entry.ended:
                break
            yield entry
        yield await final_view(services, task_id)
    except (GeneratorExit, anyio.get_cancelled_exc_class()):
        services.store.request_cancel(task_id)
        raise


async def merged_chunks(services: Services, task_ids: list[str]) -> AsyncIterator[tuple[int, StreamEntry | TaskView]]:
    """`chunks_then_result` of several tasks (an answer's choices) as their chunks come, each tagged with
    its task's place. Leaving early closes every task's reader, which cancels each task."""
    readers = [chunks_then_result(services, task_id) for task_id in task_ids]
    pending = {asyncio.ensure_future(anext(reader)): i for i, reader in enumerate(readers)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                yield index, item
                pending[asyncio.ensure_future(anext(readers[index]))] = index
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for reader in readers:
            await reader.aclose()


async def final_views(
    services: Services, task_ids: list[str], disconnected: Callable[[], Awaitable[bool]]
) -> list[TaskView] | None:
    """Every task's finished view, in order; None when the client left first (every task is then
    cancelled). StreamBroken if one failed or is gone."""
    for task_id in task_ids:
        if not await until_ended(services, task_id, disconnected):
            for other in task_ids:
                services.store.request_cancel(other)
            return None
    return [await final_view(services, task_id) for task_id in task_ids]


async def final_view(services: Services, task_id: str) -> TaskView:
    """The view of a task whose stream has ended; StreamBroken if it failed or is gone."""
    view = await anyio.to_thread.run_sync(services.store.view, task_id)
    if view is None:
        raise StreamBroken(f"task {task_id} has expired")
    if view.status == TaskStatus.failed:
        raise StreamBroken(view.error or "the generation failed")
    return view


async def until_ended(services: Services, task_id: str, disconnected: Callable[[], Awaitable[bool]]) -> bool:
    """Wait for the task's end; False as soon as `disconnected()` says the client left (then the
    task is cancelled, so the model does not go on for nobody)."""
    ended = False
    async with anyio.create_task_group() as tasks:

        async def read() -> None:
            nonlocal ended
            async for entry in follow(services.aredis, task_id):
                ended = entry.ended
            tasks.cancel_scope.cancel()

        async def watch() -> None:
            while not await disconnected():
                await anyio.sleep(DISCONNECT_CHECK_S)
            tasks.cancel_scope.cancel()

        tasks.start_soon(read)
        tasks.start_soon(watch)
    if not ended:
        await anyio.to_thread.run_sync(services.store.request_cancel, task_id)
    return ended

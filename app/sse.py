"""A Server-Sent Events response for routes that stream only on request (`"stream": true`).

FastAPI's own SSE (a path operation that yields, with `EventSourceResponse`) always streams;
OpenAI's routes answer JSON or a stream from one path. This gives the latter the same wire
format (`fastapi.sse.format_sse_event`) and the same keep-alive `: ping` comment while idle.
No `id:` lines are ever written: the official openai SDK fails on a ping after one. Chat and
Completions streams are `data:` lines only; Responses streams name each event (`event:`).
"""

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi.sse import KEEPALIVE_COMMENT, ServerSentEvent, format_sse_event
from starlette.responses import StreamingResponse

PING_S = 15.0


def sse_response(
    data: AsyncIterator[str | ServerSentEvent],
    headers: dict[str, str] | None = None,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> StreamingResponse:
    """Each string `data` yields becomes one `data:` event, and each ServerSentEvent its `event:`
    and `data:` lines (its `raw_data`, already JSON), with pings while it yields nothing.
    `on_close` is awaited once the stream ends, however it ends (`app.streams.hold_stream`)."""
    return StreamingResponse(
        _with_pings(data, on_close),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


async def _with_pings(
    data: AsyncIterator[str | ServerSentEvent], on_close: Callable[[], Awaitable[None]] | None
) -> AsyncIterator[bytes]:
    try:
        async for chunk in _pinged(data):
            yield chunk
    finally:
        if on_close is not None:
            await on_close()


async def _pinged(data: AsyncIterator[str | ServerSentEvent]) -> AsyncIterator[bytes]:
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=1)

    async def produce() -> None:
        async with send:
            async for item in data:
                await send.send(_encode(item))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(produce)
        async with receive:
            while True:
                try:
                    with anyio.fail_after(PING_S):
                        chunk = await receive.receive()
                except TimeoutError:
                    chunk = KEEPALIVE_COMMENT
                except anyio.EndOfStream:
                    return
                yield chunk


def _encode(item: str | ServerSentEvent) -> bytes:
    if isinstance(item, str):
        return format_sse_event(data_str=item)
    return format_sse_event(data_str=item.raw_data, event=item.event)

"""A Server-Sent Events response for routes that stream only on request (`"stream": true`).

FastAPI's own SSE (a path operation that yields, with `EventSourceResponse`) always streams;
OpenAI's routes answer JSON or a stream from one path. This gives the latter the same wire
format (`fastapi.sse.format_sse_event`) and the same keep-alive `: ping` comment while idle.
Only `data:` lines are written: the official openai SDK fails on a ping after an `id:` line.
"""

from collections.abc import AsyncIterator

import anyio
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from starlette.responses import StreamingResponse

PING_S = 15.0


def sse_response(data: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """Each string `data` yields becomes one `data:` event, with pings while it yields nothing."""
    return StreamingResponse(
        _with_pings(data),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


async def _with_pings(data: AsyncIterator[str]) -> AsyncIterator[bytes]:
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=1)

    async def produce() -> None:
        async with send:
            async for item in data:
                await send.send(format_sse_event(data_str=item))

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

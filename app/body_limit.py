"""Bodies above MAX_REQUEST_BYTES answer 413, each in its API family's own error envelope.

The limit is enforced where a route reads its body: by Content-Length at the first read, and by
counting a chunked body's bytes. It raises an HTTPException, which each family's handlers turn
into its envelope (OpenAI's, llama.cpp's, FastAPI's), as they do every other refusal; FastAPI's
own `max_body_size` answers a plain-text 413 that no family's client can parse.

Before it answers, the rest of the refused body is read and dropped (up to DRAIN_BYTES, for up to
DRAIN_S), as nginx's lingering close does: a client that sends its whole body before reading
(Python's `urllib`) otherwise meets a connection reset instead of the 413, since a socket closed
with unread data resets.
"""

import anyio

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """`max_bytes` for every body but uploads: `uploads` maps an upload route's path to its own limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _drain(receive)
                raise _too_large(limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await _drain(receive)
                raise _too_large(limit)
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"the request body is above this server's limit of {limit} bytes")


DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_S = 5.0


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of a request's body, within the bounds."""
    drained = 0
    with anyio.move_on_after(DRAIN_S):
        while drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

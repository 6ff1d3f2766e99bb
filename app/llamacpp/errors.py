"""llama.cpp's error envelope, `{"error": {"code", "message", "type"}}`, for this family's routes.

The routes share the root of the URL space with our own, so instead of a sub-application the
family's router has a route class that turns every refusal raised while handling one of its
requests (validation, API key, limits, Redis away) into that envelope.
"""

from collections.abc import Callable, Coroutine
from typing import Any

import kombu.exceptions
import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from app.errors import REDIS_DOWN, AsciiJSONResponse
from app.llamacpp.protocol import ErrorDetail, ErrorResponse

# The internal request's field names, as llama.cpp calls them.
PARAMS = {"max_new_tokens": "n_predict", "repetition_penalty": "repeat_penalty", "prompt_ids": "prompt"}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}


def envelope(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """ASCII, since a message may quote what the client sent."""
    detail = ErrorDetail(code=status, message=message, type=TYPES.get(status, "invalid_request_error"))
    return AsciiJSONResponse(status_code=status, content=ErrorResponse(error=detail).model_dump(), headers=headers)


class LlamaCppRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return envelope(400, _describe(exc))
            except HTTPException as exc:
                return envelope(exc.status_code, str(exc.detail), headers=exc.headers)
            except (redis.RedisError, kombu.exceptions.OperationalError):
                return envelope(503, REDIS_DOWN, headers={"Retry-After": "5"})

        return route


def _describe(exc: RequestValidationError) -> str:
    """'field: problem' for each error, without the input."""
    parts = []
    for error in exc.errors():
        where = ".".join(PARAMS.get(str(p), str(p)) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts)

"""Errors the API turns into clear answers instead of 500s, one installer for every API family.

Routes raise the same exceptions whatever family they serve (bad input, a `Refusal`, an HTTP
error, Redis away); each family says only how it writes a refusal (`Family`), and `install` (for
an app) or `family_route` (for a router sharing an app with another family) answers with it.
"""

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import kombu.exceptions
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

REDIS_DOWN = "the task queue (Redis) is unreachable; try again shortly"


def field_error(field: str | tuple[str | int, ...], message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the body field at fault (a name, or a path such as
    `("messages", 2, "content")`)."""
    loc = (field,) if isinstance(field, str) else field
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": kind}])


def task_not_found(task_id: str) -> HTTPException:
    """One answer for an unknown id and for another key's task, so ids cannot be probed."""
    return HTTPException(status_code=404, detail=f"no task with id {task_id!r} (never submitted, or expired)")


class AsciiJSONResponse(JSONResponse):
    """Escapes all but ASCII, so that a lone surrogate taken from a request cannot break the answer."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class Refusal(Exception):
    """A refusal every family can write: its status, message, the parameter at fault and a code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers


class ContextExceeded(Exception):
    """The prompt does not fit the context even with older history trimmed away: the system prompt and
    the newest message alone need `needed` tokens of the `limit` left beside max_new_tokens, in a
    context of `context` tokens. Families name it as their peers do (OpenAI's `context_length_exceeded`,
    llama.cpp's `exceed_context_size_error`)."""

    def __init__(self, field: str, message: str, needed: int, limit: int, context: int) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.needed = needed
        self.limit = limit
        self.context = context


class Family(ABC):
    """How one API family writes every refusal: its envelope, and its own names for the internal
    request's fields (`params`), so a field any family maps onto the internal request is named
    in the family's own terms wherever it is refused."""

    params: dict[str, str] = {}

    @abstractmethod
    def refusal(self, refused: Refusal) -> Response: ...

    def invalid(self, exc: RequestValidationError) -> Response:
        """Bad input: a 400 naming the first parameter at fault."""
        error = exc.errors()[0]
        param = self.param([part for part in error.get("loc", ()) if part != "body"])
        message = f"{param}: {error.get('msg')}" if param else str(error.get("msg"))
        return self.refusal(Refusal(400, message, param=param))

    def context_exceeded(self, exc: ContextExceeded) -> Response:
        """Bad input naming the field, unless the family has its own name for it."""
        return self.invalid(field_error(exc.field, exc.message))

    def param(self, loc: Sequence[object]) -> str | None:
        """A location in the internal request (or the family's own body) as the family's parameter."""
        parts = [str(part) for part in loc]
        if parts:
            parts[0] = self.params.get(parts[0], parts[0])
        return ".".join(parts) or None


class FastAPIFamily(Family):
    """Ours (/generate, /task): FastAPI's shapes, `{"detail": ...}`, and 422 for bad input."""

    def refusal(self, refused: Refusal) -> Response:
        return JSONResponse(status_code=refused.status, content={"detail": refused.message}, headers=refused.headers)

    def invalid(self, exc: RequestValidationError) -> Response:
        """FastAPI's 422 without the echoed `input`, which may hold NaN or a lone surrogate (neither fits
        in a JSON answer), or a megabyte of prompt."""
        errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
        return AsciiJSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


REFUSED = (
    RequestValidationError, Refusal, ContextExceeded, StarletteHTTPException, redis.RedisError,
    kombu.exceptions.OperationalError,
)


def answer(family: Family, exc: Exception) -> Response:
    """Every refusal the API expects, in `family`'s envelope: bad input, a Refusal, an HTTP error, and
    Redis being down (503), the one outage the API expects: never a hang or a 500."""
    if isinstance(exc, RequestValidationError):
        return family.invalid(exc)
    if isinstance(exc, Refusal):
        return family.refusal(exc)
    if isinstance(exc, ContextExceeded):
        return family.context_exceeded(exc)
    if isinstance(exc, StarletteHTTPException):
        return family.refusal(Refusal(exc.status_code, str(exc.detail), headers=exc.headers))
    return family.refusal(Refusal(503, _redis_detail(exc), code="service_unavailable", headers={"Retry-After": "5"}))


def _redis_detail(exc: Exception) -> str:
    """Unreachable, or reachable but refusing (out of memory, read-only, a key of the wrong type):
    the refusal's code (its first word, never data) tells an operator which."""
    if not isinstance(exc, redis.ResponseError):
        return REDIS_DOWN
    first_word = str(exc).split(" ", 1)[0]
    code = first_word if first_word.isupper() else type(exc).__name__
    return f"the task queue (Redis) refused the request ({code}); try again shortly"


def install(app: FastAPI, family: Family) -> None:
    """The app answers every refusal in `family`'s envelope."""

    async def handler(_: Request, exc: Exception) -> Response:
        return answer(family, exc)

    for kind in REFUSED:
        app.add_exception_handler(kind, handler)


def family_route(family: Family) -> type[APIRoute]:
    """A route class for a family whose routes share an app with another family's (llama.cpp's at the
    root beside ours, Responses in the OpenAI app beside Chat): refusals raised while handling one
    of its requests, dependencies included, are answered in its envelope."""

    class FamilyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except REFUSED as exc:
                    return answer(family, exc)

            return route

    return FamilyRoute

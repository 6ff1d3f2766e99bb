"""Errors the API turns into clear answers instead of 500s."""

import json

import kombu.exceptions
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without the echoed `input`, which may hold NaN or a lone surrogate (neither fits
    in a JSON answer), or a megabyte of prompt."""
    errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
    return AsciiJSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": _redis_detail(exc)}, headers={"Retry-After": "5"})


def _redis_detail(exc: Exception) -> str:
    """Unreachable, or reachable but refusing (out of memory, read-only, a key of the wrong type):
    the refusal's code (its first word, never data) tells an operator which."""
    if not isinstance(exc, redis.ResponseError):
        return REDIS_DOWN
    first_word = str(exc).split(" ", 1)[0]
    code = first_word if first_word.isupper() else type(exc).__name__
    return f"the task queue (Redis) refused the request ({code}); try again shortly"


def install(app: FastAPI) -> None:
    """Bad input answers 422 whatever it holds; Redis being down, the one outage the API expects,
    answers 503: never a hang or a 500."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(redis.RedisError, _redis_down)
    app.add_exception_handler(kombu.exceptions.OperationalError, _redis_down)


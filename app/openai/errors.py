"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, for every refusal on /v1.

Installed on the OpenAI sub-application only, so the other routes keep FastAPI's shape: bad
input is a 400 naming the parameter (where /generate answers 422), then 401, 404, 413, 429 with
Retry-After, 503.
"""

import kombu.exceptions
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.errors import REDIS_DOWN, AsciiJSONResponse
from app.openai.protocol import ErrorDetail, ErrorResponse

# The internal request's field names, as OpenAI's parameters call them: in Chat and Completions,
# and in Responses.
PARAMS = {
    "max_new_tokens": "max_tokens", "system_prompt": "messages", "json_schema": "response_format", "prompt_ids": "prompt",
}
RESPONSES_PARAMS = {
    "max_new_tokens": "max_output_tokens", "system_prompt": "instructions", "messages": "input",
    "json_schema": "text.format",
}
TYPES = {429: "rate_limit_error", 503: "server_error"}
CODES = {
    401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=kind, param=param, code=code)


def envelope(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    """ASCII, since a message may quote what the client sent (a `model` holding a lone surrogate)."""
    return AsciiJSONResponse(status_code=status, content=ErrorResponse(error=detail).model_dump(), headers=headers)


async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return envelope(exc.status, exc.detail)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The first error, its location as the parameter ("messages.2.content"), without the input."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    names = RESPONSES_PARAMS if "/responses" in request.url.path else PARAMS
    if loc:
        loc[0] = names.get(loc[0], loc[0])
    param = ".".join(loc) or None
    message = f"{param}: {error.get('msg')}" if param else str(error.get("msg"))
    return envelope(400, ErrorDetail(message=message, type="invalid_request_error", param=param))


async def _http(_: Request, exc: HTTPException) -> JSONResponse:
    kind = TYPES.get(exc.status_code, "invalid_request_error")
    detail = ErrorDetail(message=str(exc.detail), type=kind, code=CODES.get(exc.status_code))
    return envelope(exc.status_code, detail, headers=exc.headers)


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    detail = ErrorDetail(message=REDIS_DOWN, type="server_error", code="service_unavailable")
    return envelope(503, detail, headers={"Retry-After": "5"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(redis.RedisError, _redis_down)
    app.add_exception_handler(kombu.exceptions.OperationalError, _redis_down)

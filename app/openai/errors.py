"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, for every refusal on /v1.

Bad input is a 400 naming the parameter (where /generate answers 422), then 401, 404, 413, 429
with Retry-After, 503. Chat and Completions name the internal request's fields one way, Responses
another (`max_output_tokens`, `instructions`, `input`, `text.format`): each is a family of its own.
"""

from fastapi.responses import Response

from app.errors import AsciiJSONResponse, ContextExceeded, Family, Refusal
from app.openai.protocol import ErrorDetail, ErrorResponse

TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}
CODES = {
    401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
    503: "service_unavailable",
}

# OpenAI's routes raise Refusals; this name says whose envelope they are written in.
OpenAIError = Refusal


class OpenAIFamily(Family):
    def __init__(self, params: dict[str, str]) -> None:
        self.params = params

    def refusal(self, refused: Refusal) -> Response:
        """ASCII, since a message may quote what the client sent (a `model` holding a lone surrogate)."""
        detail = ErrorDetail(
            message=refused.message, type=refused.kind or TYPES.get(refused.status, "invalid_request_error"),
            param=refused.param, code=refused.code or CODES.get(refused.status),
        )
        return AsciiJSONResponse(
            status_code=refused.status, content=ErrorResponse(error=detail).model_dump(), headers=refused.headers
        )

    def context_exceeded(self, exc: ContextExceeded) -> Response:
        """OpenAI's code for it, which clients (LangChain among them) look for."""
        param = self.param([exc.field])
        return self.refusal(Refusal(400, f"{param}: {exc.message}", param=param, code="context_length_exceeded"))


# The internal request's field names, as OpenAI's parameters call them.
CHAT = OpenAIFamily({
    "max_new_tokens": "max_tokens", "system_prompt": "messages", "json_schema": "response_format", "prompt_ids": "prompt",
})
RESPONSES = OpenAIFamily({
    "max_new_tokens": "max_output_tokens", "system_prompt": "instructions", "messages": "input",
    "json_schema": "text.format",
})

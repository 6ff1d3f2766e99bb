"""llama.cpp's error envelope, `{"error": {"code", "message", "type"}}`, for this family's routes.

The routes share the root of the URL space with our own, so the family's router has a route
class (app.errors.family_route) that answers every refusal raised while handling one of its
requests (validation, API key, limits, Redis away) in this envelope.
"""

from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from app.errors import AsciiJSONResponse, ContextExceeded, Family, Refusal, family_route
from app.llamacpp.protocol import ContextErrorDetail, ErrorDetail, ErrorResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}


def envelope(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """ASCII, since a message may quote what the client sent."""
    detail = ErrorDetail(code=status, message=message, type=TYPES.get(status, "invalid_request_error"))
    return AsciiJSONResponse(status_code=status, content=ErrorResponse(error=detail).model_dump(), headers=headers)


class LlamaCppFamily(Family):
    # The internal request's field names, as llama.cpp calls them.
    params = {"max_new_tokens": "n_predict", "repetition_penalty": "repeat_penalty", "prompt_ids": "prompt"}

    def refusal(self, refused: Refusal) -> Response:
        return envelope(refused.status, refused.message, refused.headers)

    def invalid(self, exc: RequestValidationError) -> Response:
        """'field: problem' for each error, without the input."""
        parts = []
        for error in exc.errors():
            where = self.param([part for part in error.get("loc", ()) if part != "body"])
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return envelope(400, "; ".join(parts))

    def context_exceeded(self, exc: ContextExceeded) -> Response:
        """llama-server's own: its type, the prompt's tokens and the context's size."""
        detail = ContextErrorDetail(
            code=400, message=f"{self.param([exc.field])}: {exc.message}", type="exceed_context_size_error",
            n_prompt_tokens=exc.needed, n_ctx=exc.context,
        )
        return AsciiJSONResponse(status_code=400, content={"error": detail.model_dump()})


LlamaCppRoute = family_route(LlamaCppFamily())

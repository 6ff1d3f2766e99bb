"""OpenAI requests onto the one internal request, and task results back into OpenAI's shapes."""

import time

from app.openai.errors import OpenAIError
from app.openai.protocol import ChatCompletionRequest, CompletionRequest, Sampling, Usage
from core.protocol import Role, TaskView

ROLES = {"system": Role.system, "developer": Role.system, "user": Role.user, "assistant": Role.assistant}


def check_model(model: str, served: list[str]) -> None:
    if model not in served:
        raise OpenAIError(
            404, f"the model '{model}' does not exist; this server serves {', '.join(served)}",
            param="model", code="model_not_found",
        )


def check_supported(body: Sampling, served: list[str]) -> None:
    """The model must be one this server serves; options it cannot honour are refused by name."""
    check_model(body.model, served)
    if body.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    refuse_unsupported(body.first_used())


def refuse_unsupported(option: str | None) -> None:
    """A 400 naming an option of OpenAI's that this server does not implement (None: none was used)."""
    if option is not None:
        raise OpenAIError(
            400, f"'{option}' is not supported by this server", param=option, code="unsupported_parameter"
        )


def chat_request(body: ChatCompletionRequest) -> dict[str, object]:
    """The internal request as a dict, validated by the admission path like any other."""
    return _sampling(body, body.max_completion_tokens or body.max_tokens) | {
        "messages": [{"role": ROLES[m.role], "content": m.text()} for m in body.messages]
    }


def completion_request(body: CompletionRequest) -> dict[str, object]:
    """A Completions prompt is the model's raw input: no chat template, no system prompt."""
    return _sampling(body, body.max_tokens) | {"prompt": body.prompt, "raw": True}


def _sampling(body: Sampling, max_tokens: int | None) -> dict[str, object]:
    """Only what the client set: the rest takes the server's defaults, as for /generate."""
    values = {
        "max_new_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stops() or None,
        "json_schema": body.response_format.schema_wanted() if body.response_format else None,
    }
    return {key: value for key, value in values.items() if value is not None}


def finish_reason(view: TaskView) -> str:
    """OpenAI knows `stop` (the model ended, a stop string, or a cancel) and `length` (the token or
    time limit)."""
    return "length" if view.finish_reason in ("length", "timeout") else "stop"


def usage(view: TaskView) -> Usage:
    prompt = view.usage.prompt_tokens if view.usage else 0
    completion = view.usage.completion_tokens if view.usage else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def created_now() -> int:
    return int(time.time())

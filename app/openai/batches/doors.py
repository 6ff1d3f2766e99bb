"""Each endpoint a batch may name, as its live route has it: a line's body becomes tasks by the same
checks and mapping, and their answer is the body the route would have sent.

`parse` raises what the route would have refused with (a validation error, a Refusal, a prompt the
context cannot hold); `refusal` turns that into the status and error body the route would have
answered, for the line's entry in the error file.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.admission import internal_request, prompt_of
from app.deps import Services
from app.errors import REFUSED, answer
from app.openai import convert
from app.openai.errors import CHAT, RESPONSES
from app.openai.protocol import ChatCompletionRequest, CompletionRequest
from app.openai.responses import convert as responses
from app.openai.responses.protocol import ResponseCreateRequest
from app.openai.routes import chat_answer, completion_answer, served_models
from core.protocol import GenerateRequest, TaskView

Parsed = tuple[BaseModel, list[GenerateRequest]]


@dataclass(frozen=True)
class Door:
    parse: Callable[[dict[str, Any], Services], Parsed]
    answer: Callable[[BaseModel, list[str], list[TaskView], Services], dict[str, Any]]
    family: Any  # its error rendering


def _named(body: Any, services: Services) -> None:
    body.model = convert.model_named(body.model, served_models(services), services.settings.any_model_name)
    if getattr(body, "stream", False):
        raise RequestValidationError([{"loc": ("body", "stream"), "msg": "a batch's lines are answered whole",
                                       "type": "value_error"}])


def _checked(requests: list[GenerateRequest], services: Services) -> list[GenerateRequest]:
    """As admission will check each (the prompt fits, no forged turns, known token ids): a line that would
    be refused is refused while the file is validated."""
    for request in requests:
        ready = request.with_defaults(services.settings)
        prompt_of(ready, services, ready.max_new_tokens or services.settings.default_max_new_tokens)
    return requests


def _chat(body: dict[str, Any], services: Services) -> Parsed:
    request = ChatCompletionRequest.model_validate(body)
    _named(request, services)
    convert.check_chat(request)
    convert.check_supported(request)
    fields = convert.chat_request(request, services.settings.default_system_prompt)
    return request, _checked([internal_request(f) for f in convert.choices([fields], request)], services)


def _completions(body: dict[str, Any], services: Services) -> Parsed:
    request = CompletionRequest.model_validate(body)
    _named(request, services)
    convert.check_supported(request)
    prompts = convert.completion_requests(request)
    return request, _checked([internal_request(f) for f in convert.choices(prompts, request)], services)


def _responses(body: dict[str, Any], services: Services) -> Parsed:
    request = ResponseCreateRequest.model_validate(body)
    _named(request, services)
    if request.background:
        raise RequestValidationError([{"loc": ("body", "background"), "msg": "a batch's lines run in the "
                                       "background already", "type": "value_error"}])
    responses.check_supported(request)
    internal = internal_request(responses.internal_fields(request, services.settings.default_system_prompt))
    return request, _checked([internal], services)


def _response_answer(body: BaseModel, task_ids: list[str], views: list[TaskView], services: Services) -> dict:
    assert isinstance(body, ResponseCreateRequest)
    request = internal_request(responses.internal_fields(body, services.settings.default_system_prompt))
    settings = responses.settings_of(body, request.with_defaults(services.settings))
    return responses.response(task_ids[0], settings, views[0]).model_dump()


DOORS = {
    "/v1/chat/completions": Door(
        _chat, lambda b, ids, views, s: chat_answer(b, ids, views, s, int(time.time())).model_dump(), CHAT  # type: ignore[arg-type]
    ),
    "/v1/completions": Door(
        _completions, lambda b, ids, views, s: completion_answer(b, ids, views, s, int(time.time())).model_dump(),  # type: ignore[arg-type]
        CHAT,
    ),
    "/v1/responses": Door(_responses, _response_answer, RESPONSES),
}


def refusal(door: Door, exc: Exception) -> tuple[int, dict[str, Any]]:
    """The status and error body the live route would have answered `exc` with."""
    if isinstance(exc, ValidationError):
        exc = RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    rendered = answer(door.family, exc)
    return rendered.status_code, json.loads(bytes(rendered.body))


def is_refusal(exc: Exception) -> bool:
    return isinstance(exc, (*REFUSED, ValidationError))

"""/v1/models, /v1/chat/completions and /v1/completions: thin routes over the one admission path.

Each answer's `id` is tied to its task (`chatcmpl-<task id>`, `cmpl-<task id>`) and the
`X-Task-Id` header names it, so the text can still be read from `/task/{id}`.
"""

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.admission import admit, internal_request
from app.deps import Services, ServicesDep
from app.openai import convert
from app.openai.errors import OpenAIError
from app.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorDetail,
    ErrorResponse,
    Model,
    ModelList,
    Sampling,
)
from app.security import CallerTag
from app.sse import sse_response
from app.streams import (
    CLIENT_GONE,
    StreamBroken,
    StreamEntry,
    admit_streaming,
    chunks_then_result,
    final_view,
    until_ended,
)
from core.protocol import TaskView
from model_loader.source import model_name

router = APIRouter()
STARTED = int(time.time())
OWNER = "queued-llama"
DONE = "[DONE]"


def served_models(services: Services) -> list[str]:
    """The model's own name, and MODEL_ALIAS when set: the names `model` may give."""
    alias = services.settings.model_alias
    return [model_name(services.settings), *([alias] if alias else [])]


@router.get("/models", response_model=ModelList)
def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=[Model(id=name, created=STARTED, owned_by=OWNER) for name in served_models(services)])


@router.get("/models/{model_id:path}", response_model=Model)
def get_model(model_id: str, services: ServicesDep) -> Model:
    if model_id not in served_models(services):
        raise OpenAIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return Model(id=model_id, created=STARTED, owned_by=OWNER)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, caller: CallerTag
) -> Response:
    convert.check_chat(body)
    fields = convert.chat_request(body, services.settings.default_system_prompt)
    task_id, on_close = await admit_streaming(
        services, caller, body.stream, lambda: _admit(body, fields, services, caller)
    )
    answer_id, created = f"chatcmpl-{task_id}", convert.created_now()

    def chunk(delta: Delta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        answer = ChatCompletionChunk(id=answer_id, created=created, model=body.model, choices=[choice])
        return answer.model_dump_json()

    def usage_chunk(view: TaskView) -> str:
        return ChatCompletionChunk(
            id=answer_id, created=created, model=body.model, choices=[], usage=convert.usage(view)
        ).model_dump_json()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        answer = convert.ChatStream(body, task_id, services.tokenizer, chunk)
        events = _stream(
            services, task_id, chunk(Delta(role="assistant", content="")), answer.delta, answer.last,
            usage_chunk if include_usage else None,
        )
        return sse_response(events, {"X-Task-Id": task_id}, on_close)
    view = await _result(services, task_id, request)
    if view is None:
        return Response(status_code=CLIENT_GONE)
    content, calls = convert.answer_of(body, view.text, task_id)
    message = AssistantMessage(content=content, tool_calls=calls or None)
    logprobs = None
    if body.logprobs:
        logprobs = convert.chat_logprobs(await run_in_threadpool(services.store.logprobs, task_id), services.tokenizer)
    finish = convert.finish_reason(view, calls)
    choice = ChatChoice(message=message, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
    answer = ChatCompletion(
        id=answer_id, created=created, model=body.model, choices=[choice], usage=convert.usage(view)
    )
    return JSONResponse(answer.model_dump(), headers={"X-Task-Id": task_id})


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, services: ServicesDep, caller: CallerTag) -> Response:
    task_id, on_close = await admit_streaming(
        services, caller, body.stream, lambda: _admit(body, convert.completion_request(body), services, caller)
    )
    answer_id, created = f"cmpl-{task_id}", convert.created_now()

    def answer(choices: list[CompletionChoice], view: TaskView | None = None) -> Completion:
        usage = convert.usage(view) if view is not None else None
        return Completion(id=answer_id, created=created, model=body.model, choices=choices, usage=usage)

    def chunk(text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None) -> str:
        choice = CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        return answer([choice]).model_dump_json()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offset = 0

        def delta(entry: StreamEntry) -> list[str]:
            nonlocal offset
            scored = None
            if body.logprobs is not None:
                scored = convert.completion_logprobs(list(zip(entry.token_ids, entry.logprobs)), services.tokenizer, offset)
            offset += len(entry.text or "")
            return [chunk(entry.text or "", logprobs=scored)]

        events = _stream(
            services, task_id, None, delta,
            lambda view: [chunk("", convert.finish_reason(view))],
            (lambda view: answer([], view).model_dump_json()) if include_usage else None,
        )
        return sse_response(events, {"X-Task-Id": task_id}, on_close)
    view = await _result(services, task_id, request)
    if view is None:
        return Response(status_code=CLIENT_GONE)
    logprobs = None
    if body.logprobs is not None:
        scored = await run_in_threadpool(services.store.logprobs, task_id)
        logprobs = convert.completion_logprobs(scored, services.tokenizer)
    finish = convert.finish_reason(view)
    choice = CompletionChoice(text=view.text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
    return JSONResponse(answer([choice], view).model_dump(), headers={"X-Task-Id": task_id})


async def _admit(body: Sampling, fields: dict[str, object], services: Services, caller: str | None) -> str:
    """Refuse what this family cannot honour, then the admission every door shares."""
    convert.check_supported(body, served_models(services))
    background = body.service_tier == "flex"
    return await run_in_threadpool(admit, internal_request(fields), services, caller, None, background)


async def _result(services: Services, task_id: str, request: Request) -> TaskView | None:
    """The finished view; None when the client left first (its task is then cancelled)."""
    if not await until_ended(services, task_id, request.is_disconnected):
        return None
    try:
        return await final_view(services, task_id)
    except StreamBroken as exc:
        raise OpenAIError(500, str(exc), kind="server_error") from exc


async def _stream(
    services: Services,
    task_id: str,
    first: str | None,
    delta: Callable[[StreamEntry], list[str]],
    last: Callable[[TaskView], list[str]],
    usage: Callable[[TaskView], str] | None,
) -> AsyncIterator[str]:
    """OpenAI's stream: an optional first chunk, the chunks of each piece of text, the finishing chunks, the
    usage chunk when asked for, then [DONE]; an error after the start is a `data: {"error"}` line."""
    if first is not None:
        yield first
    try:
        async for item in chunks_then_result(services, task_id):
            if isinstance(item, StreamEntry):
                for event in delta(item):
                    yield event
                continue
            for event in last(item):
                yield event
            if usage is not None:
                yield usage(item)
    except StreamBroken as exc:
        yield ErrorResponse(error=ErrorDetail(message=str(exc), type="server_error")).model_dump_json()
    yield DONE

"""/v1/models, /v1/chat/completions and /v1/completions: thin routes over the one admission path.

Each choice is a task of its own (`n` of them, for each prompt of a batch): the answer's `id` is
tied to the first (`chatcmpl-<task id>`, `cmpl-<task id>`), the `X-Task-Id` header names it and
`X-Task-Ids` every choice's in order, so the text can still be read from `/task/{id}`.
"""

import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.admission import admit_all, input_tokens, internal_request
from app.deps import Services, ServicesDep
from app.llamacpp.protocol import Timings
from app.openai import convert
from app.openai.errors import OpenAIError
from app.openai.protocol import (
    InputTokens,
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
    UsageChunk,
)
from app.security import CallerTag
from app.sse import sse_response
from app.streams import (
    CLIENT_GONE,
    StreamBroken,
    StreamEntry,
    admit_streaming,
    final_views,
    merged_chunks,
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
    body.model = convert.model_named(body.model, served_models(services), services.settings.any_model_name)
    convert.check_chat(body)
    fields = convert.chat_request(body, services.settings.default_system_prompt)
    task_ids, on_close = await admit_streaming(
        services, caller, body.stream, lambda: _admit(body, convert.choices([fields], body), services, caller)
    )
    answer_id, created, headers = f"chatcmpl-{task_ids[0]}", convert.created_now(), _headers(task_ids)
    fingerprint = convert.fingerprint(services.settings)

    def chunk(index: int, delta: Delta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        return ChatCompletionChunk(
            id=answer_id, created=created, model=body.model, system_fingerprint=fingerprint, choices=[choice]
        ).model_dump_json()

    def usage_chunk(views: list[TaskView]) -> str:
        return UsageChunk(
            id=answer_id, created=created, model=body.model, system_fingerprint=fingerprint, choices=[],
            usage=convert.usage(views, len(views)), timings=Timings.of(views[0]),
        ).model_dump_json()

    if body.stream:
        answers = [convert.ChatStream(body, task_id, services.tokenizer, partial(chunk, i))
                   for i, task_id in enumerate(task_ids)]
        events = _stream(
            services, task_ids, lambda i: [chunk(i, Delta(role="assistant", content=""))],
            lambda i, entry: answers[i].delta(entry), lambda i, view: answers[i].last(view),
            usage_chunk if body.stream_options and body.stream_options.include_usage else None,
        )
        return sse_response(events, headers, on_close)
    views = await _results(services, task_ids, request)
    if views is None:
        return Response(status_code=CLIENT_GONE)
    answer = await run_in_threadpool(chat_answer, body, task_ids, views, services, created)
    return JSONResponse(answer.model_dump(), headers=headers)


def chat_answer(
    body: ChatCompletionRequest, task_ids: list[str], views: list[TaskView], services: Services, created: int
) -> ChatCompletion:
    """The answer of finished tasks, one a choice, as the route answers it (a batch's lines too)."""
    choices = []
    for i, (task_id, view) in enumerate(zip(task_ids, views)):
        content, calls = convert.answer_of(body, view.text, task_id)
        logprobs = convert.chat_logprobs(services.store.logprobs(task_id), services.tokenizer) if body.logprobs else None
        choices.append(ChatChoice(
            index=i, message=AssistantMessage(content=content, tool_calls=calls or None),
            finish_reason=convert.finish_reason(view, calls), logprobs=logprobs,  # type: ignore[arg-type]
        ))
    return ChatCompletion(
        id=f"chatcmpl-{task_ids[0]}", created=created, model=body.model,
        system_fingerprint=convert.fingerprint(services.settings), choices=choices,
        usage=convert.usage(views, len(views)),
    )


@router.post("/chat/completions/input_tokens", response_model=InputTokens)
async def chat_input_tokens(body: ChatCompletionRequest, services: ServicesDep) -> InputTokens:
    """The tokens the chat's prompt takes, as llama-server counts them; nothing is queued."""
    body.model = convert.model_named(body.model, served_models(services), services.settings.any_model_name)
    convert.check_chat(body)
    internal = internal_request(convert.chat_request(body, services.settings.default_system_prompt))
    return InputTokens(input_tokens=await input_tokens(internal, services))


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, services: ServicesDep, caller: CallerTag) -> Response:
    body.model = convert.model_named(body.model, served_models(services), services.settings.any_model_name)
    prompts = convert.completion_requests(body)
    task_ids, on_close = await admit_streaming(
        services, caller, body.stream, lambda: _admit(body, convert.choices(prompts, body), services, caller)
    )
    answer_id, created, headers = f"cmpl-{task_ids[0]}", convert.created_now(), _headers(task_ids)
    fingerprint = convert.fingerprint(services.settings)

    def answer(choices: list[CompletionChoice], views: list[TaskView] | None = None) -> Completion:
        usage = convert.usage(views, body.n) if views is not None else None
        return Completion(id=answer_id, created=created, model=body.model, system_fingerprint=fingerprint,
                          choices=choices, usage=usage)

    def chunk(index: int, text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        return answer([choice]).model_dump_json()

    if body.stream:
        offsets = [0] * len(task_ids)

        def delta(index: int, entry: StreamEntry) -> list[str]:
            scored = None
            if body.logprobs is not None:
                pairs = list(zip(entry.token_ids, entry.logprobs))
                scored = convert.completion_logprobs(pairs, services.tokenizer, offsets[index])
            offsets[index] += len(entry.text or "")
            return [chunk(index, entry.text or "", logprobs=scored)]

        events = _stream(
            services, task_ids, lambda i: [], delta, lambda i, view: [chunk(i, "", convert.finish_reason(view))],
            (lambda views: answer([], views).model_dump_json())
            if body.stream_options and body.stream_options.include_usage else None,
        )
        return sse_response(events, headers, on_close)
    views = await _results(services, task_ids, request)
    if views is None:
        return Response(status_code=CLIENT_GONE)
    whole = await run_in_threadpool(completion_answer, body, task_ids, views, services, created)
    return JSONResponse(whole.model_dump(), headers=headers)


def completion_answer(
    body: CompletionRequest, task_ids: list[str], views: list[TaskView], services: Services, created: int
) -> Completion:
    """The answer of finished tasks, one a choice, as the route answers it (a batch's lines too)."""
    choices = []
    for i, (task_id, view) in enumerate(zip(task_ids, views)):
        logprobs = None
        if body.logprobs is not None:
            logprobs = convert.completion_logprobs(services.store.logprobs(task_id), services.tokenizer)
        choices.append(CompletionChoice(
            index=i, text=view.text, finish_reason=convert.finish_reason(view), logprobs=logprobs,  # type: ignore[arg-type]
        ))
    return Completion(id=f"cmpl-{task_ids[0]}", created=created, model=body.model,
                      system_fingerprint=convert.fingerprint(services.settings), choices=choices,
                      usage=convert.usage(views, body.n))


def _headers(task_ids: list[str]) -> dict[str, str]:
    """The first choice's task, as every answer names it; with several choices, each one's in order."""
    return {"X-Task-Id": task_ids[0], **({"X-Task-Ids": ",".join(task_ids)} if len(task_ids) > 1 else {})}


async def _admit(body: Sampling, requests: list[dict[str, object]], services: Services, caller: str | None) -> list[str]:
    """Refuse what this family cannot honour, then the admission every door shares, a task per choice."""
    convert.check_supported(body)
    return await admit_all([internal_request(fields) for fields in requests], services, caller,
                           background=body.service_tier == "flex")


async def _results(services: Services, task_ids: list[str], request: Request) -> list[TaskView] | None:
    try:
        return await final_views(services, task_ids, request.is_disconnected)
    except StreamBroken as exc:
        raise OpenAIError(500, str(exc), kind="server_error") from exc


async def _stream(
    services: Services,
    task_ids: list[str],
    first: Callable[[int], list[str]],
    delta: Callable[[int, StreamEntry], list[str]],
    last: Callable[[int, TaskView], list[str]],
    usage: Callable[[list[TaskView]], str] | None,
) -> AsyncIterator[str]:
    """OpenAI's stream: each choice's first chunks, its chunks as its text comes (the choices' interleaved),
    its finishing chunks, then the usage chunk when asked for, then [DONE]; an error after the start
    is a `data: {"error"}` line."""
    for index in range(len(task_ids)):
        for event in first(index):
            yield event
    views: dict[int, TaskView] = {}
    try:
        async for index, item in merged_chunks(services, task_ids):
            if isinstance(item, StreamEntry):
                for event in delta(index, item):
                    yield event
                continue
            views[index] = item
            for event in last(index, item):
                yield event
        if usage is not None:
            yield usage([views[i] for i in sorted(views)])
    except StreamBroken as exc:
        yield ErrorResponse(error=ErrorDetail(message=str(exc), type="server_error")).model_dump_json()
    yield DONE

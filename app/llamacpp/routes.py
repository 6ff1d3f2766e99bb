"""/completion, /tokenize, /detokenize and /props, as llama.cpp's server answers them."""

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from tokenizers import Tokenizer

from app.admission import TOKENIZING, admit_all, internal_request
from app.deps import Services, ServicesDep
from app.errors import ContextExceeded, Refusal
from app.limits import check_prompt_chars
from app.llamacpp.errors import LlamaCppRoute
from app.llamacpp.protocol import (
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    CompletionRequest,
    CompletionResult,
    DetokenizeRequest,
    DetokenizeResponse,
    Piece,
    StreamPiece,
    TokenProbability,
    TopProbability,
    Timings,
    TokenizeRequest,
    TokenizeResponse,
)
from app.security import CallerTag
from app.sse import sse_response
from app.streams import CLIENT_GONE, StreamBroken, StreamEntry, admit_streaming, final_views, merged_chunks
from app.tokens import scored_token, spoken
from core.protocol import GenerateRequest, TaskView, sampling_defaults
from core.settings import Settings
from model_loader.source import model_name
from prompts import PromptTooLong, build_prompt

router = APIRouter(route_class=LlamaCppRoute, tags=["llama.cpp"])
STOP_TYPES = {"eos": "eos", "length": "limit", "timeout": "limit", "stop": "word"}
MAX_BATCH = 8  # prompts in one /completion, each a task


@router.post("/completion", response_model=CompletionResult)
async def completion(body: CompletionRequest, request: Request, services: ServicesDep, caller: CallerTag) -> Response:
    """One prompt, or a batch of them (a task each, answered as a list in order)."""
    prompts = _batch(body.prompt)
    common = _internal(body, services.settings, services.tokenizer)
    requests = [internal_request(common | _prompt(prompt, services.tokenizer)) for prompt in prompts]
    task_ids, on_close = await admit_streaming(
        services, caller, body.stream, lambda: admit_all(requests, services, caller)
    )
    headers = {"X-Task-Id": task_ids[0], **({"X-Task-Ids": ",".join(task_ids)} if len(task_ids) > 1 else {})}
    if body.stream:
        return sse_response(_pieces(services, task_ids, body, prompts), headers, on_close)
    try:
        views = await final_views(services, task_ids, request.is_disconnected)
    except StreamBroken as exc:
        raise Refusal(500, str(exc)) from exc
    if views is None:
        return Response(status_code=CLIENT_GONE)
    answers = []
    for index, (task_id, view, prompt) in enumerate(zip(task_ids, views, prompts)):
        result = _result(view, body, services.settings, prompt, index)
        if body.n_probs:
            scored = await run_in_threadpool(services.store.logprobs, task_id)
            result.completion_probabilities = _probabilities(scored, services.tokenizer)
        answers.append(_fields(result.model_dump(exclude_none=True), body.response_fields))
    return JSONResponse(answers if len(answers) > 1 else answers[0], headers=headers)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, services: ServicesDep) -> Response:
    limit = services.settings.max_prompt_chars
    if len(body.content) > limit:
        raise Refusal(400, f"content: {len(body.content)} characters, above this server's limit of {limit}")
    result = await anyio.to_thread.run_sync(_tokenize, body, services, limiter=TOKENIZING)
    return JSONResponse(result.model_dump())


def _tokenize(body: TokenizeRequest, services: Services) -> TokenizeResponse:
    ids = services.tokenizer.encode(body.content, add_special_tokens=body.add_special).ids
    if body.with_pieces:
        return TokenizeResponse(tokens=[Piece(id=i, piece=services.tokenizer.decode([i], skip_special_tokens=False))
                                        for i in ids])
    return TokenizeResponse(tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
def detokenize(body: DetokenizeRequest, services: ServicesDep) -> Response:
    vocabulary = services.tokenizer.get_vocab_size(with_added_tokens=True)
    if unknown := [i for i in body.tokens if not 0 <= i < vocabulary]:
        raise Refusal(400, f"tokens: {unknown[0]} is not a token id (the vocabulary has {vocabulary})")
    content = services.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(content=content).model_dump())


@router.post("/apply-template", response_model=ApplyTemplateResponse)
async def apply_template(body: ApplyTemplateRequest, services: ServicesDep) -> Response:
    """The prompt a chat of these messages gives the model, as text: the chat format with the server's
    default system prompt where the chat has none, as a worker builds it (llama-server renders only the
    messages)."""
    internal = internal_request({"messages": [message.model_dump() for message in body.messages]})
    check_prompt_chars(internal, services.settings.max_prompt_chars)
    prompt = await anyio.to_thread.run_sync(_rendered, internal, services, limiter=TOKENIZING)
    return JSONResponse(ApplyTemplateResponse(prompt=prompt).model_dump())


def _rendered(internal: GenerateRequest, services: Services) -> str:
    try:
        prompt = build_prompt(services.formatter, internal, services.settings.default_system_prompt,
                              services.context_window)
    except PromptTooLong as exc:
        raise ContextExceeded("messages", str(exc), exc.needed, exc.limit, services.context_window) from exc
    return services.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)


@router.get("/props")
def props(services: ServicesDep) -> dict[str, Any]:
    """What llama.cpp's /props reports that this server has: its defaults, slots and context."""
    settings = services.settings
    return {
        "default_generation_settings": {"n_ctx": services.context_window, "params": _defaults(settings)},
        "total_slots": settings.worker_slots,
        "n_ctx": services.context_window,
        "chat_template": services.chat_template,
        "model": model_name(settings),
        "model_path": model_name(settings),
    }


def _internal(body: CompletionRequest, settings: Settings, tokenizer: Tokenizer) -> dict[str, object]:
    """Everything but the prompt; -1 for n_predict is the server's limit, and for seed a random one."""
    fields = {
        "max_new_tokens": settings.max_new_tokens_limit if body.n_predict == -1 else body.n_predict,
        "temperature": body.temperature,
        "top_k": body.top_k,
        "top_p": body.top_p,
        "stop": body.stop,
        "seed": None if body.seed == -1 else body.seed,
        "repetition_penalty": body.repeat_penalty,
        "logprobs": body.n_probs or None,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": _biases(body.logit_bias, tokenizer),
        "grammar": body.grammar or None,
        "json_schema": None if body.grammar else body.json_schema,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _fields(result: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    """The result, or only `wanted` of it (`response_fields`): a path `a/b` is the nested field, kept
    under its path as llama-server keeps it; a field the result lacks is left out."""
    if not wanted:
        return result
    picked: dict[str, Any] = {}
    for path in wanted:
        value: Any = result
        for part in path.split("/"):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            picked[path] = value
    return picked


def _batch(prompt: str | list) -> list[str | list[int | str]]:
    """llama-server's reading of `prompt`: a list holding a bare token id is one prompt (ids mixed with
    text); any other list is a batch of prompts."""
    if isinstance(prompt, str) or any(isinstance(part, int) for part in prompt):
        return [prompt]
    if not 1 <= len(prompt) <= MAX_BATCH:
        raise Refusal(400, f"prompt: a batch holds 1 to {MAX_BATCH} prompts, each a task")
    return prompt


def _prompt(prompt: str | list[int | str], tokenizer: Tokenizer) -> dict[str, object]:
    """Text as the raw prompt; a list as token ids, its strings tokenized in place (the first with BOS
    where the tokenizer adds one, as llama-server tokenizes a mixed prompt)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "raw": True}
    ids: list[int] = []
    for i, part in enumerate(prompt):
        ids += [part] if isinstance(part, int) else tokenizer.encode(part, add_special_tokens=i == 0).ids
    return {"prompt_ids": ids}


def _biases(given: list | dict | None, tokenizer: Tokenizer) -> dict[str, float] | None:
    """llama.cpp's logit_bias, as pairs or a map, onto ours: a key that is text biases each of its
    tokens, as llama-server does; false (ban the token) is the lowest bias."""
    if not given:
        return None
    biases: dict[str, float] = {}
    for key, bias in given.items() if isinstance(given, dict) else given:
        ids = [int(key)] if isinstance(key, int) or key.isdigit() else tokenizer.encode(key, add_special_tokens=False).ids
        biases |= {str(token_id): -100.0 if bias is False else bias for token_id in ids}
    return biases


def _defaults(settings: Settings) -> dict[str, object]:
    """The server's defaults under llama.cpp's names."""
    ours = sampling_defaults(settings)
    return {
        "n_predict": ours["max_new_tokens"],
        "temperature": ours["temperature"],
        "top_k": ours["top_k"],
        "top_p": ours["top_p"],
        "repeat_penalty": ours["repetition_penalty"],
        "seed": -1,
        "stop": [],
    }


def _result(
    view: TaskView, body: CompletionRequest, settings: Settings, prompt: str | list[int | str], index: int = 0,
    content: str | None = None,
) -> CompletionResult:
    stop_type = STOP_TYPES.get(view.finish_reason or "", "none")
    text = view.text if content is None else content
    requested = {"n_predict": body.n_predict, "temperature": body.temperature, "top_k": body.top_k,
                 "top_p": body.top_p, "repeat_penalty": body.repeat_penalty, "seed": body.seed, "stop": body.stop}
    return CompletionResult(
        content=text,
        has_new_line="\n" in text,
        stop_type=stop_type,  # type: ignore[arg-type]
        stopped_eos=stop_type == "eos",
        stopped_limit=stop_type == "limit",
        stopped_word=stop_type == "word",
        stopping_word=view.stop_string or "",
        tokens_predicted=view.usage.completion_tokens if view.usage else 0,
        tokens_evaluated=view.usage.prompt_tokens if view.usage else 0,
        generation_settings=_defaults(settings) | {k: v for k, v in requested.items() if v is not None},
        model=view.model or model_name(settings),
        prompt=prompt,
        index=index,
        id_slot=0,
        slot_id=0,
        timings=Timings.of(view),
    )


def _probabilities(scored: list[tuple[int, list | None]], tokenizer: Tokenizer) -> list[TokenProbability]:
    """Each token's entry as llama-server writes it, from the log probabilities kept with the chunks."""

    def top(token_id: int, logprob: float | None) -> TopProbability:
        return TopProbability(id=token_id, **scored_token(tokenizer, token_id, logprob))

    return [
        TokenProbability(**top(token_id, lp[0] if lp else None).model_dump(),
                         top_logprobs=[top(i, p) for i, p in (lp[1] if lp else [])])
        for token_id, lp in spoken(tokenizer, scored)
    ]


class _Clock:
    """One answer's timings as it streams (`timings_per_token`): the prompt's tokens and the task's first
    start from its record, when the first chunk was written and when each since was, from the chunks'
    stream ids (Redis's clock, in ms)."""

    def __init__(self, services: Services, task_id: str) -> None:
        self._services = services
        self._task_id = task_id
        self._prompt: tuple[int, float] | None = None
        self._first_ms: int | None = None
        self._tokens = 0

    async def timings(self, entry: StreamEntry) -> Timings | None:
        at_ms = int(entry.cursor.split("-")[0])
        self._first_ms = self._first_ms or at_ms
        self._tokens += len(entry.token_ids)
        self._prompt = self._prompt or await run_in_threadpool(self._services.store.prompt_started, self._task_id)
        if self._prompt is None:
            return None
        prompt_n, started_at = self._prompt
        first_token_s = max(0.0, self._first_ms / 1000 - started_at)
        return Timings.so_far(prompt_n, first_token_s, self._tokens, (at_ms - self._first_ms) / 1000)


async def _pieces(
    services: Services, task_ids: list[str], body: CompletionRequest, prompts: list[str | list[int | str]]
) -> AsyncIterator[str]:
    """`{"index", "content", "stop": false}` per chunk (a batch's prompts interleaved), then each prompt's
    whole result with `stop: true` and no text of its own (it was streamed), and no `[DONE]`: llama.cpp's
    stream."""
    clocks = [_Clock(services, task_id) for task_id in task_ids] if body.timings_per_token else []
    try:
        async for index, item in merged_chunks(services, task_ids):
            if isinstance(item, StreamEntry):
                scored = _probabilities(list(zip(item.token_ids, item.logprobs)), services.tokenizer) or None
                timings = await clocks[index].timings(item) if clocks else None
                piece = StreamPiece(index=index, content=item.text or "", completion_probabilities=scored,
                                    timings=timings)
                yield piece.model_dump_json(exclude_none=True)
            else:
                result = _result(item, body, services.settings, prompts[index], index, content="")
                yield result.model_dump_json(exclude_none=True)
    except StreamBroken as exc:
        yield json.dumps({"error": {"code": 500, "message": str(exc), "type": "server_error"}})

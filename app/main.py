"""The FastAPI app: builds the services once at startup and mounts the routes.

Run with `uvicorn app.main:app --host "$API_HOST" --port "$API_PORT"`: the exposure check reads
API_HOST, so the two must agree (devstack and compose pass the settings' values).
"""

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app import errors, streams, webhooks
from app.body_limit import BodyLimit
from app.deps import Services
from app.openai.app import create_openai_app, share_services
from app.openai.batches import driver as batch_driver
from app.openai.files.routes import FILES_PATH, upload_limit
from app.llamacpp import routes as llamacpp
from app.metrics import CountRejections
from app.routes import generate, health, metrics, page, tasks
from app.security import KeyBeforeBody, authenticate
from core.protocol import ErrorBody
from core.batches import BatchStore
from core.files import FileStore
from core.redis_client import connect, connect_async
from core.settings import Settings, get_settings
from core.store import LEASES_KEY, TaskStore
from model_loader.source import model_name, tokenizer_dir
from prompts import chat_template, context_window, load_formatter
from prompts.tokens import load_tokenizer
from core.queue import Lanes, make_celery


def build_services() -> Services:
    """The tokenizer is loaded here (no torch) so that prompts are budgeted before they are queued."""
    settings = get_settings()
    folder = tokenizer_dir(settings)
    client = connect(settings)
    return Services(
        settings=settings,
        redis=client,
        aredis=connect_async(settings, longest_block_s=streams.BLOCK_MS / 1000),
        store=TaskStore(client, settings.result_ttl_s, model=model_name(settings)),
        files=FileStore(client, settings.files_bytes_per_key),
        batches=BatchStore(client),
        lanes=Lanes(client, LEASES_KEY),
        celery=make_celery(settings),
        formatter=load_formatter(folder, settings.prompt_format, model_name(settings)),
        tokenizer=load_tokenizer(folder, specials_as_text=False),
        chat_template=chat_template(folder),
        context_window=settings.usable_context(context_window(folder, settings.context_window)),
    )


def check_exposure(settings: Settings) -> None:
    """An API that anyone on the network can reach and that needs no key is a mistake more often
    than a choice: it refuses to start unless ALLOW_OPEN_API says it is a choice."""
    if settings.accepted_api_keys or settings.allow_open_api or _is_loopback(settings.api_host):
        return
    raise RuntimeError(
        f"refusing to serve without API_KEYS on {settings.api_host}, beyond this machine: set API_KEYS, "
        "or ALLOW_OPEN_API=true to serve an open API on purpose, or API_HOST=127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    check_exposure(settings)
    app.state.services = build_services()
    for family in app.state.families:
        share_services(family, app.state.services)
    async with anyio.create_task_group() as background:
        background.start_soon(batch_driver.run, app.state.services)
        background.start_soon(webhooks.run, app.state.services)
        yield
        background.cancel_scope.cancel()
    await app.state.services.aredis.aclose()


class OptionalTrailingSlash:
    """Every route answers with and without a trailing slash, directly: clients such as Python's
    `http.client` do not follow the 307 that Starlette would otherwise answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        await self.app(scope, receive, send)


UNAUTHORIZED: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown API key"}
}


# OpenAI's routes that llama.cpp's server also answers without the /v1 prefix.
UNPREFIXED = [("/models", ["GET"]), ("/models/{model_id:path}", ["GET"]), ("/chat/completions", ["POST"]),
              ("/chat/completions/input_tokens", ["POST"]), ("/completions", ["POST"])]


def create_app(settings: Settings) -> FastAPI:
    """Every route but /health, /metrics (and the OpenAPI docs) checks the API key, when keys are set."""
    hidden = {} if settings.public_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Queued Llama chat", lifespan=lifespan, redirect_slashes=False, **hidden)
    errors.install(app, errors.FastAPIFamily())
    app.add_middleware(KeyBeforeBody)  # inside BodyLimit: a keyless body is a 401 before any 413 or 422
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, uploads={FILES_PATH: upload_limit(settings)})
    app.add_middleware(CountRejections)  # outside BodyLimit, so its 413s are counted too
    app.add_middleware(OptionalTrailingSlash)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    for module in (generate, tasks, llamacpp):
        app.include_router(module.router, dependencies=[Depends(authenticate)], responses=UNAUTHORIZED)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(page.router)  # the chat page: no key, like /health; it sends the key itself
    openai_app = create_openai_app(settings.public_docs)
    app.mount("/v1", openai_app)
    for path, methods in UNPREFIXED:  # as llama-server serves them beside /v1, in OpenAI's envelope too
        app.router.routes.append(Route(path, openai_app, methods=methods, include_in_schema=False))
    app.state.families = [openai_app]
    return app


app = create_app(get_settings())

"""The FastAPI app: builds the services once at startup and mounts the routes.

Run with `uvicorn app.main:app` (or `python -m app`, which reads host and port from settings).
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import errors
from app.deps import Services
from app.routes import generate, health, tasks
from app.security import authenticate
from core.protocol import ErrorBody
from core.settings import Settings, get_settings
from core.store import TaskStore
from model_loader.source import model_dir, model_name
from prompts import context_window, load_formatter
from worker.celery_app import app as celery_app


def build_services() -> Services:
    """The tokenizer is loaded here (no torch) so that prompts are budgeted before they are queued."""
    settings = get_settings()
    folder = model_dir(settings, tokenizer_only=True)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    return Services(
        settings=settings,
        redis=client,
        store=TaskStore(client, settings.result_ttl_s),
        celery=celery_app,
        formatter=load_formatter(folder, settings.prompt_format, model_name(settings)),
        context_window=context_window(folder, settings.context_window),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    logging.basicConfig(level=get_settings().log_level)
    app.state.services = build_services()
    yield


UNAUTHORIZED: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown API key"}
}


def create_app(settings: Settings) -> FastAPI:
    """Every route but /health (and the OpenAPI docs) checks the API key, when keys are set.

    FastAPI's own body limit answers 413 by Content-Length, and by counting a chunked body's bytes.
    """
    app = FastAPI(title="Queued Llama chat", lifespan=lifespan, max_body_size=settings.max_request_bytes)
    errors.install(app)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    for module in (generate, tasks):
        app.include_router(module.router, dependencies=[Depends(authenticate)], responses=UNAUTHORIZED)
    app.include_router(health.router)
    return app


app = create_app(get_settings())

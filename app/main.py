"""The FastAPI app: builds the services once at startup and mounts the routes.

Run with `uvicorn app.main:app` (or `python -m app`, which reads host and port from settings).
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from app import errors
from app.deps import Services
from app.routes import generate, health, tasks
from core.settings import get_settings
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


app = FastAPI(title="Queued Llama chat", lifespan=lifespan)
errors.install(app)
for module in (generate, tasks, health):
    app.include_router(module.router)

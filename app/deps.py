"""What the handlers need, built once at startup and handed out as typed dependencies."""

from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio
from celery import Celery
from fastapi import Depends, Request

from core.batches import BatchStore
from core.files import FileStore
from core.queue import Lanes
from core.settings import Settings
from core.store import TaskStore
from tokenizers import Tokenizer

from prompts import ChatFormatter


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    aredis: redis.asyncio.Redis  # for the stream routes' blocking reads
    store: TaskStore
    files: FileStore
    batches: BatchStore
    lanes: Lanes
    celery: Celery
    formatter: ChatFormatter
    tokenizer: Tokenizer  # for llama.cpp's /tokenize and /detokenize: control tokens as tokens
    chat_template: str
    context_window: int


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

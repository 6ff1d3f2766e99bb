"""The Celery task: a few lines that unpack the payload and hand it to the process's runtime."""

from functools import cached_property

import redis
from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_shutdown
from pydantic import ValidationError

from core.protocol import GenerateRequest
from core.settings import get_settings
from worker.celery_app import GENERATE_TASK, app
from worker.runtime import WorkerRuntime


class GenerationTask(Task):
    """Holds the process's one runtime, and so its one model."""

    @cached_property
    def runtime(self) -> WorkerRuntime:
        return WorkerRuntime.start(get_settings())


@app.task(name=GENERATE_TASK, base=GenerationTask, bind=True)
def generate(self: GenerationTask, request: dict) -> None:
    """A task whose state cannot be written (Redis gone for longer than the store retries) goes
    back to the queue rather than being acknowledged as done: it runs again as a new attempt."""
    try:
        _run(self, request)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Reject(f"Redis unreachable: {exc}", requeue=True) from exc


def _run(task: GenerationTask, request: dict) -> None:
    try:
        parsed = GenerateRequest.model_validate(request)
    except ValidationError as exc:  # an API of another version, or a message not sent by the API
        task.runtime.store.fail(task.request.id, f"the worker could not read this task: {exc.errors()[0]['msg']}")
        return
    task.runtime.run(task.request.id, parsed, worker=task.request.hostname or "")


@worker_init.connect
def _load_model_at_start(**_: object) -> None:
    """Load before consuming (the threads pool shares this process), so no task pays for it."""
    generate.runtime  # noqa: B018


@worker_shutdown.connect
def _stop_engine(**_: object) -> None:
    generate.runtime.engine.close()

"""The Celery task: a few lines that unpack the payload and hand it to the process's runtime."""

import logging
import os
import signal
from functools import cached_property

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown
from pydantic import ValidationError

from core.heartbeats import Heartbeats
from core.protocol import GenerateRequest
from core.settings import get_settings
from worker.celery_app import GENERATE_TASK, app
from worker.heartbeat import Heartbeat
from worker.runtime import HandBack, WorkerRuntime

log = logging.getLogger(__name__)


class GenerationTask(Task):
    """Holds the process's one runtime, and so its one model, and the heartbeat that reports it."""

    heartbeat: Heartbeat | None = None

    @cached_property
    def runtime(self) -> WorkerRuntime:
        return WorkerRuntime.start(get_settings())


@app.task(name=GENERATE_TASK, base=GenerationTask, bind=True)
def generate(self: GenerationTask, request: dict) -> None:
    """A task this delivery cannot finish (Redis gone for longer than the store retries, the
    engine restarted under it) goes back to the queue rather than being acknowledged as done:
    it runs again as a new attempt."""
    try:
        _run(self, request)
    except HandBack as exc:
        if exc.stop_worker:
            _stop_worker()
        raise Reject(str(exc), requeue=True) from exc


def _run(task: GenerationTask, request: dict) -> None:
    try:
        parsed = GenerateRequest.model_validate(request)
    except ValidationError as exc:  # an API of another version, or a message not sent by the API
        task.runtime.store.fail(task.request.id, f"the worker could not read this task: {exc.errors()[0]['msg']}")
        return
    task.runtime.run(task.request.id, parsed, worker=task.request.hostname or "")


def _stop_worker() -> None:
    """An engine that cannot even restart would fail every task it took: stop the process (warm
    shutdown, SIGTERM) so that `make run` or the container's restart policy starts a new one."""
    log.critical("the engine cannot generate and did not recover; stopping this worker to be restarted")
    os.kill(os.getpid(), signal.SIGTERM)


@worker_init.connect
def _load_model_at_start(**_: object) -> None:
    """Load before consuming (the threads pool shares this process), so no task pays for it."""
    generate.runtime  # noqa: B018


@worker_ready.connect
def _start_heartbeat(sender: object, **_: object) -> None:
    """Tell /health, through Redis, that this worker is up and whether its engine can generate."""
    runtime = generate.runtime
    name = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    generate.heartbeat = Heartbeat(Heartbeats(runtime.store.redis), name, ready=lambda: runtime.engine.ready)
    generate.heartbeat.start()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    if generate.heartbeat is not None:
        generate.heartbeat.stop()
    generate.runtime.engine.close()

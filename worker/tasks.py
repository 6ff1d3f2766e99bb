"""The Celery task: a few lines that unpack the payload and hand it to the process's runtime."""

import json
import logging
import os
import signal
from functools import cached_property

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down
from pydantic import ValidationError

from core.heartbeats import Heartbeats
from core.protocol import GenerateRequest
from core.settings import get_settings
from model_loader.contract import EngineBroken
from core.queue import GENERATE_TASK, send_generate, sender
from worker.celery_app import app
from worker.heartbeat import Heartbeat
from worker.runtime import HandBack, WorkerRuntime

log = logging.getLogger(__name__)


class GenerationTask(Task):
    """Holds the process's one runtime, and so its one model, and the heartbeat that reports it."""

    heartbeat: Heartbeat | None = None

    @cached_property
    def runtime(self) -> WorkerRuntime:
        return WorkerRuntime.start(get_settings(), send=_send_on, send_new=sender(app))


def _send_on(task_id: str, request: str) -> None:
    """Queue a task again, ahead of new ones, for the next free worker to go on with."""
    send_generate(app, json.loads(request), task_id, takeover=True)


@app.task(name=GENERATE_TASK, base=GenerationTask, bind=True)
def generate(self: GenerationTask, request: dict) -> None:
    """A task this delivery cannot run (Redis gone for longer than the store retries, the worker
    stopping) goes back to the queue rather than being acknowledged as done. An engine that
    cannot even restart has handed its task on; then this process stops, to be started afresh."""
    try:
        _run(self, request)
    except HandBack as exc:
        raise Reject(str(exc), requeue=True) from exc
    except EngineBroken:
        _stop_worker()


def _run(task: GenerationTask, request: dict) -> None:
    try:
        parsed = GenerateRequest.model_validate(request)
    except ValidationError as exc:  # an API of another version, or a message not sent by the API
        task.runtime.store.fail(task.request.id, f"the worker could not read this task: {exc.errors()[0]['msg']}")
        return
    task.runtime.run(task.request.id, parsed, json.dumps(request), worker=task.request.hostname or "")


def _stop_worker() -> None:
    """An engine that cannot even restart would fail every task it took: stop the process (warm
    shutdown, SIGTERM) so that `make run` or the container's restart policy starts a new one."""
    log.critical("the engine cannot generate and did not recover; stopping this worker to be restarted")
    os.kill(os.getpid(), signal.SIGTERM)


@worker_init.connect
def _load_model_at_start(**_: object) -> None:
    """Load before consuming (the threads pool shares this process), so no task pays for it. A
    worker whose engine cannot start exits (Celery only logs what a signal handler raises, and
    would go on to take tasks it cannot run), so that its supervisor sees it and says why."""
    try:
        generate.runtime  # noqa: B018
    except Exception:
        log.critical("the engine did not start; this worker exits", exc_info=True)
        logging.shutdown()
        os._exit(1)


@worker_ready.connect
def _start_heartbeat_and_leases(sender: object, **_: object) -> None:
    """Tell /health, through Redis, that this worker is up and whether its engine can generate;
    renew this worker's leases and watch for lapsed ones; listen for cancels; release waiting
    tasks as slots free."""
    runtime = generate.runtime
    name = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    generate.heartbeat = Heartbeat(
        Heartbeats(runtime.store.redis), name, ready=lambda: runtime.engine.ready,
        capabilities=runtime.engine.capabilities.to_json(),
    )
    generate.heartbeat.start()
    runtime.leases.start()
    runtime.cancels.start()
    runtime.releases.start()


@worker_shutting_down.connect
def _hand_back_running_tasks(**_: object) -> None:
    """Celery's warm shutdown would wait for every running generation to end: instead each one
    stops at its next token and hands its task back, to go on in another worker at once."""
    generate.runtime.stopping.set()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    if generate.heartbeat is not None:
        generate.heartbeat.stop()
    generate.runtime.leases.stop()
    generate.runtime.cancels.stop()
    generate.runtime.releases.stop()
    generate.runtime.engine.close()

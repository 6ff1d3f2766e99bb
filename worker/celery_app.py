"""The Celery app and its configuration, importable without torch (the API sends tasks through it).

The worker imports `worker.tasks` itself (`include`), so the API process never loads the model
code. Tasks travel as json only. A running task is held under a lease its worker renews: when a
worker dies, a live one sends the task on within seconds (worker/leases.py). A task is also
acknowledged only after it ends, so Redis's visibility timeout redelivers it as a last resort.
"""

from celery import Celery

from core.redis_client import broker_transport_options, broker_url
from core.settings import get_settings

GENERATE_TASK = "generate"
QUEUE = "chat"
# kombu's Redis transport serves lower numbers first: a task sent on from a worker that died or
# stopped goes ahead of every new one, since its reader is already waiting mid-answer.
NEW_TASK_PRIORITY = 3
TAKEOVER_PRIORITY = 0
# How often a live worker looks for tasks a dead worker held past the visibility timeout (the last
# resort behind the leases). kombu's default scans only every 10th 10 s tick.
RESTORE_SCAN_S = 5


def make_celery() -> Celery:
    settings = get_settings()
    # With REDIS_SENTINELS, kombu's Sentinel transport: it asks them for the primary on each connection.
    app = Celery("chat", broker=broker_url(settings), include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_slots,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(settings)
        | {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": RESTORE_SCAN_S,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return app


def send_generate(celery: Celery, request: dict, task_id: str, takeover: bool = False) -> None:
    """Queue one generation; a `takeover` goes ahead of new tasks. Its arguments are the user's
    prompt, so the message says how Celery shows them in its logs (`argsrepr`): a placeholder,
    never the prompt, whatever gets logged (Celery prints a request with its arguments when it
    cannot cancel it after a connection loss)."""
    celery.send_task(
        GENERATE_TASK,
        args=[request],
        task_id=task_id,
        priority=TAKEOVER_PRIORITY if takeover else NEW_TASK_PRIORITY,
        argsrepr="[<request>]",
        kwargsrepr="{}",
    )


app = make_celery()

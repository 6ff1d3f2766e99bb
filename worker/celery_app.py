"""The Celery app the worker runs (`celery -A worker.celery_app worker`): the queue's own, from `core.queue`."""

from core.queue import make_celery

app = make_celery()

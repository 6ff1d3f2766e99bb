"""Cancels pushed to the worker: a thread subscribed to the store's cancel channel flags the
generations this process runs, so a cancel reaches one within a token, at no Redis cost per token.

Pub/sub drops what is sent while nobody listens (this listener reconnecting after Redis went
away): the flag in the task's record stays the truth, and `Interruptions` reads it now and then.
"""

import logging
import threading

import redis

from core.redis_client import RETRY_INTERVAL_S
from core.store import CANCELS_CHANNEL

log = logging.getLogger(__name__)


class CancelListener:
    """Until `stop`: `watch(task_id)` gives an event that is set when that task's cancel is announced."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._watched: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancels", daemon=True)

    def watch(self, task_id: str) -> threading.Event:
        with self._lock:
            return self._watched.setdefault(task_id, threading.Event())

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._watched.pop(task_id, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except redis.RedisError:  # Redis away: listen again once it is back
                log.debug("cancel channel lost; subscribing again", exc_info=True)
                self._stopping.wait(RETRY_INTERVAL_S)

    def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CANCELS_CHANNEL)
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    with self._lock:
                        event = self._watched.get(message["data"].decode())
                    if event is not None:
                        event.set()
        finally:
            pubsub.close()

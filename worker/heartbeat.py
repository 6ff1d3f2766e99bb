"""A worker process's heartbeat: every few seconds, into Redis, whether its engine can generate and what it can do."""

import logging
import threading
from collections.abc import Callable

from core.heartbeats import BEAT_S, Heartbeats

log = logging.getLogger(__name__)


class Heartbeat:
    """Beats on a daemon thread until `stop`, which also takes the worker off the list at once."""

    def __init__(self, heartbeats: Heartbeats, name: str, ready: Callable[[], bool], capabilities: dict) -> None:
        self._heartbeats = heartbeats
        self._name = name
        self._ready = ready
        self._capabilities = capabilities
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=BEAT_S)
        try:
            self._heartbeats.remove(self._name)
        except Exception:  # Redis away: the entry goes stale by itself
            log.debug("heartbeat entry not removed", exc_info=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._heartbeats.beat(self._name, ready=self._ready(), capabilities=self._capabilities)
            except Exception:  # Redis away: /health says so by itself; beat again once it is back
                log.debug("heartbeat not written", exc_info=True)
            self._stopping.wait(BEAT_S)

"""A worker's side of the lanes: it releases waiting tasks to Celery as slots free (`core.queue`).

Each worker releases right after each of its tasks ends (a slot of its own just freed) and once
a second besides (a worker that just became ready, a task that ended in another process, a
release whose message was lost), so the fleet's free slots are filled within about a second
even if every API is gone. Every release is one script in Redis, so workers never release the
same task twice.
"""

import logging
import threading

from core.queue import Lanes, Priority, Send

log = logging.getLogger(__name__)

SCAN_S = 1.0


class Releases:
    """Releases on a daemon thread until `stop`; `nudge` releases at once."""

    def __init__(self, lanes: Lanes, send: Send, priority: Priority) -> None:
        self._lanes = lanes
        self._send = send
        self._priority = priority
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="releases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def nudge(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=2 * SCAN_S)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(SCAN_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._lanes.release(self._send, self._priority)
                self._lanes.resend_overdue(self._send)
            except Exception:  # Redis away: the next tick tries again
                log.debug("no release this tick", exc_info=True)

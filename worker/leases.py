"""A worker's side of the leases: it renews those it holds, and sends on the tasks whose lease lapsed.

Every worker scans for lapsed leases, so a task whose worker died (killed, out of memory, its
host gone), froze or was cut off from Redis is sent on by whichever live worker sees it first;
the store's script lets only one of them reclaim it. The message goes ahead of every new task
(its reader is waiting mid-answer), and the attempt that runs it goes on from the chunks
already published.
"""

import logging
import threading
import time
from collections.abc import Callable

from core.store import TaskStore

log = logging.getLogger(__name__)

SCAN_S = 1.0

Send = Callable[[str, str], None]


class Leases:
    """The leases one worker process holds, renewed on a daemon thread until `stop`."""

    def __init__(self, store: TaskStore, renew_s: float, send: Send, stall_s: float) -> None:
        """`send(task_id, request)` queues the task again, ahead of new ones, with its stored request.
        A task whose generation made no progress for `stall_s` is no longer renewed."""
        self._store = store
        self._renew_s = renew_s
        self._send = send
        self._stall_s = stall_s
        self._held: dict[str, int] = {}
        self._progress: dict[str, float] = {}  # when each held task's generation last moved
        self._unsent: dict[str, str] = {}  # reclaimed, but Redis refused the message: sent next tick
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)

    def hold(self, task_id: str, attempt: int) -> None:
        with self._lock:
            self._held[task_id] = attempt
            self._progress[task_id] = time.monotonic()

    def alive(self, task_id: str) -> None:
        """The task's generation moved (a token, or a check between steps). Called at every token,
        so without the lock: a plain dict assignment is atomic, and only held tasks are tracked."""
        if task_id in self._progress:
            self._progress[task_id] = time.monotonic()

    def let_go(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)
            self._progress.pop(task_id, None)

    def hand_back(self, task_id: str, attempt: int, clean: bool) -> None:
        """Give a task this worker holds to the next free worker now, rather than when its lease
        lapses. `clean`: the worker is stopping, which does not count against MAX_ATTEMPTS."""
        self.let_go(task_id)
        request = self._store.release(task_id, attempt, clean)
        if request is not None:
            self._send(task_id, request)
            log.info("task %s: attempt %d handed back; it goes on in the next free worker", task_id, attempt)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2 * SCAN_S)

    def _run(self) -> None:
        renew_at = 0.0
        while not self._stopping.wait(min(SCAN_S, self._renew_s)):
            try:
                if time.monotonic() >= renew_at:
                    self._renew()
                    renew_at = time.monotonic() + self._renew_s
                self._reclaim()
            except Exception:  # Redis away: the writes of the tasks themselves say so; try again next tick
                log.debug("leases not renewed or scanned", exc_info=True)

    def _renew(self) -> None:
        """Renew what this worker holds, but not a generation stuck inside one step (a hung engine
        would hold its task for good): its lease lapses, another worker takes the task over, and
        whatever the stuck attempt writes later is fenced off."""
        now = time.monotonic()
        with self._lock:
            for task_id, moved in list(self._progress.items()):
                if now - moved > self._stall_s:
                    log.error("task %s: no token for %.0f s; its lease is left to lapse, for another worker to "
                              "take over", task_id, now - moved)
                    self._progress.pop(task_id, None)
                    self._held.pop(task_id, None)
            held = dict(self._held)
        for task_id in self._store.renew(held):
            log.warning("task %s: another worker has taken it over; attempt %d stops", task_id, held[task_id])
            with self._lock:
                if self._held.get(task_id) == held[task_id]:
                    del self._held[task_id]

    def _reclaim(self) -> None:
        """Send on each task whose holder let its lease lapse (never one this worker holds)."""
        with self._lock:
            held = set(self._held)
        for task_id in self._store.lapsed():
            if task_id not in held and (request := self._store.reclaim_lapsed(task_id)) is not None:
                log.warning("task %s: its worker's lease lapsed; sending it on to the next free worker", task_id)
                self._unsent[task_id] = request
        for task_id, request in list(self._unsent.items()):
            self._send(task_id, request)
            del self._unsent[task_id]
            self._store.sent_on(task_id)

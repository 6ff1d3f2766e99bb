"""Why one attempt must stop, asked after every token, at no Redis cost per token.

A cancel is pushed to the worker (`worker.cancels`), so it takes effect at the next token. Each
append of a chunk also says whether the task was cancelled or taken over (the store's script
checks as it writes, and a superseded attempt's append writes nothing). When nothing has been
heard for `CHECK_S` (text held back for a stop string, a cancel announced while the listener was
reconnecting), one read of the record fills the gap. The worker's own stop and the time limit
need no Redis at all.
"""

import threading
import time
from collections.abc import Callable

from core.protocol import HANDED_BACK
from core.store import TaskStore
from model_loader.contract import TokenLogprob

CHECK_S = 1.0


class Interruptions:
    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        attempt: int,
        deadline: float,
        stopping: threading.Event,
        cancelled: threading.Event,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        """`deadline` on the monotonic clock; `stopping` set when the worker is shutting down;
        `cancelled` set when the task's cancel is announced; `progress` told at every token, so
        that the lease of a generation stuck inside one step is left to lapse."""
        self._store = store
        self._cancelled = cancelled
        self._task_id = task_id
        self._attempt = attempt
        self._deadline = deadline
        self._stopping = stopping
        self._reason: str | None = None
        self._heard_at = time.monotonic()
        self._progress = progress
        self._appended = 0

    def publish(self, text: str, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        """The engine's `on_chunk`: append, and keep what the append said."""
        number, self._appended = self._appended, self._appended + 1
        self._reason = self._reason or self._store.append_chunk(
            self._task_id, self._attempt, number, text, token_ids, logprobs
        )
        self._heard_at = time.monotonic()

    def __call__(self) -> str | None:
        """The engine's `interruption`: cancelled or superseded (from Redis), else handed back or timeout."""
        now = time.monotonic()
        self._progress()
        if self._reason is None and self._cancelled.is_set():
            self._reason = "cancelled"
        if self._reason is None and now - self._heard_at >= CHECK_S:
            self._reason = self._store.stop_reason(self._task_id, self._attempt)
            self._heard_at = now
        if self._reason is not None:
            return self._reason
        if self._stopping.is_set():
            return HANDED_BACK
        return "timeout" if now > self._deadline else None

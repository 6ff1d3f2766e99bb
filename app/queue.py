"""Where a queued task stands: how many tasks will start before it, and about when it will start.

Its place under fair sharing (`core.queue.Lanes.place`: its rank in its own lane, and what the
other lanes and the released tasks put before it); the wait is that many tasks' worth of the
recent generation times, shared among the ready workers' slots. A few small Redis reads per
lane with work, however long the lanes.
"""

import math
import statistics
from collections.abc import AsyncIterator

import anyio

from app.deps import Services
from core.heartbeats import Heartbeats
from core.protocol import QueuePlace

# A stream tells a waiting client its place again when it changes, looking this often.
WATCH_S = 1.0


def queue_place(services: Services, task_id: str) -> QueuePlace | None:
    """None once the task has left the queue (or was never in it)."""
    ahead = services.lanes.place(task_id, services.settings.background_share)
    if ahead is None:
        return None
    return QueuePlace(queue_position=ahead, estimated_start_s=_estimated_start_s(services, ahead))


def _estimated_start_s(services: Services, ahead: int) -> float | None:
    """Each slot finishes a task every median generation time; this task starts once the tasks
    ahead of it and one more (the ones running now) have: an estimate on the long side."""
    recent = services.store.recent_generation_s()
    slots = sum(worker.slots for worker in Heartbeats(services.redis).live() if worker.ready)
    if not recent or not slots:
        return None
    return math.ceil((math.floor(ahead / slots) + 1) * statistics.median(recent) * 10) / 10  # up: never 0 s


async def places(services: Services, task_id: str) -> AsyncIterator[QueuePlace]:
    """The task's place each time it changes, for as long as it waits in the queue."""
    last: QueuePlace | None = None
    while (place := await anyio.to_thread.run_sync(queue_place, services, task_id)) is not None:
        if place != last:
            yield place
            last = place
        await anyio.sleep(WATCH_S)

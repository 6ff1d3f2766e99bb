"""Where a queued task stands: how many tasks will start before it, and about when it will start.

Its rank among the new tasks waiting (one ZRANK), plus the tasks taken over from a worker that
wait at the front of the queue; the wait is that many tasks' worth of the recent generation
times, shared among the ready workers' slots. A few small Redis reads, however long the queue.
"""

import math
import statistics
from collections.abc import AsyncIterator

import anyio

from app.deps import Services
from core.heartbeats import Heartbeats
from core.protocol import QueuePlace
from worker.celery_app import QUEUE

# A stream tells a waiting client its place again when it changes, looking this often.
WATCH_S = 1.0


def queue_place(services: Services, task_id: str) -> QueuePlace | None:
    """None once the task has left the queue (or was never in it)."""
    rank = services.store.queue_rank(task_id)
    if rank is None:
        return None
    ahead = rank + services.redis.llen(QUEUE)  # priority 0's list, the plain name: takeovers only
    return QueuePlace(queue_position=ahead, estimated_start_s=_estimated_start_s(services, ahead))


def _estimated_start_s(services: Services, ahead: int) -> float | None:
    """Each slot finishes a task every median generation time; this task starts once the tasks
    ahead of it and one more (the ones running now) have: an estimate on the long side."""
    recent = services.store.recent_generation_s()
    slots = sum(worker.slots for worker in Heartbeats(services.redis).live() if worker.ready)
    if not recent or not slots:
        return None
    return round((math.floor(ahead / slots) + 1) * statistics.median(recent), 1)


async def places(services: Services, task_id: str) -> AsyncIterator[QueuePlace]:
    """The task's place each time it changes, for as long as it waits in the queue."""
    last: QueuePlace | None = None
    while (place := await anyio.to_thread.run_sync(queue_place, services, task_id)) is not None:
        if place != last:
            yield place
            last = place
        await anyio.sleep(WATCH_S)

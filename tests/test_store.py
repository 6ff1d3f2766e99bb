"""The task store against a real redis-server: the compare-and-set steps that workers race on."""

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from core.store import TaskStore

DELIVERIES = 8
ROUNDS = 20


@pytest.fixture
def store(redis_server: str) -> Iterator[TaskStore]:
    client = redis.Redis.from_url(redis_server)
    yield TaskStore(client, ttl_s=600)
    client.close()


def start_together(store: TaskStore, task_id: str, deliveries: int) -> list[int]:
    """`deliveries` threads call `start` on one task at the same moment, as redelivered copies would."""
    barrier = threading.Barrier(deliveries)
    attempts: list[int] = []
    lock = threading.Lock()

    def deliver(n: int) -> None:
        barrier.wait()
        attempt = store.start(task_id, f"worker-{n}")
        with lock:
            attempts.append(attempt)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(deliveries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return attempts


def test_deliveries_that_start_at_once_each_get_their_own_attempt(store: TaskStore) -> None:
    """Were the attempt read back apart from the increment, two deliveries could both run as the newest."""
    for _ in range(ROUNDS):
        task_id = str(uuid.uuid4())
        store.create(task_id)
        assert sorted(start_together(store, task_id, DELIVERIES)) == list(range(1, DELIVERIES + 1))

"""The task store against a real redis-server: the compare-and-set steps that workers race on,
and leases changing hands."""

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from core.protocol import TaskStatus
from core.store import TaskStore
from devstack.processes import wait_until

pytestmark = pytest.mark.fast

DELIVERIES = 8
ROUNDS = 20
LEASE_S = 0.3


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis) -> TaskStore:
    return TaskStore(client, ttl_s=600, lease_s=LEASE_S)


def new_task(store: TaskStore) -> str:
    task_id = str(uuid.uuid4())
    store.create(task_id)
    return task_id


def start_together(store: TaskStore, task_id: str, deliveries: int) -> list[int]:
    """`deliveries` threads call `start` on one task at the same moment, as redelivered copies would."""
    barrier = threading.Barrier(deliveries)
    attempts: list[int] = []
    lock = threading.Lock()

    def deliver(n: int) -> None:
        barrier.wait()
        attempt = store.start(task_id, f"worker-{n}", "{}").attempt
        with lock:
            attempts.append(attempt)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(deliveries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return attempts


def test_deliveries_that_start_at_once_leave_one_holder(store: TaskStore) -> None:
    """Were the holder checked apart from the grant, two deliveries could both run the task."""
    for _ in range(ROUNDS):
        assert sorted(start_together(store, new_task(store), DELIVERIES)) == [0] * (DELIVERIES - 1) + [1]


def lapse(store: TaskStore, task_id: str) -> None:
    wait_until(lambda: task_id in store.lapsed(limit=10_000), 10, "the lease to lapse")


def test_a_lapsed_lease_is_reclaimed_once_and_the_next_attempt_goes_on_from_the_published_tokens(
    store: TaskStore,
) -> None:
    task_id = new_task(store)
    first = store.start(task_id, "a", '{"prompt": "hi"}')
    assert store.append_chunk(task_id, first.attempt, 0, "Hello", [1, 2]) is None
    assert store.start(task_id, "b", "{}").found == "held", "a duplicate delivery ran beside the holder"
    lapse(store, task_id)

    assert store.reclaim_lapsed(task_id) == '{"prompt": "hi"}'
    assert store.reclaim_lapsed(task_id) is None, "reclaimed twice"
    assert store.append_chunk(task_id, first.attempt, 1, " stale", [3]) == "superseded", "the old holder still writes"
    assert store.stop_reason(task_id, first.attempt) == "superseded"
    assert store.renew({task_id: first.attempt}) == [task_id]

    second = store.start(task_id, "b", '{"prompt": "hi"}')
    assert second.attempt == 2 and second.first_started_at == first.first_started_at
    assert store.published(task_id).token_ids == [1, 2] and store.published(task_id).text == "Hello"
    assert store.renew({task_id: second.attempt}) == []


def test_an_append_sent_again_after_its_reply_was_lost_is_written_once(store: TaskStore) -> None:
    """The worker's retry resends a call whose reply Redis never sent (it restarted just after)."""
    task_id = new_task(store)
    attempt = store.start(task_id, "a", "{}").attempt
    for number, text in [(0, "Once"), (1, " upon"), (1, " upon"), (2, " a")]:
        assert store.append_chunk(task_id, attempt, number, text, [number]) is None
    published = store.published(task_id)
    assert (published.text, published.token_ids) == ("Once upon a", [0, 1, 2])


def test_a_task_deleted_mid_answer_stays_gone_whatever_its_worker_writes(store: TaskStore) -> None:
    """DELETE /v1/responses/{id} removes a running task; its worker, not yet stopped, must not bring
    back a record that has no status (every read of it would fail)."""
    task_id = new_task(store)
    attempt = store.start(task_id, "a", "{}").attempt
    store.delete(task_id)
    store.note_prompt(task_id, attempt, 12)
    assert store.append_chunk(task_id, attempt, 0, "Once", [0]) == "superseded"
    assert store.renew({task_id: attempt}) == [task_id]
    store.fail(task_id, "no", attempt)
    assert store.view(task_id) is None and store.status(task_id) is None


def test_a_clean_hand_back_does_not_count_as_an_attempt(store: TaskStore) -> None:
    task_id = new_task(store)
    first = store.start(task_id, "a", "{}")
    assert store.release(task_id, first.attempt + 1, clean=True) is None, "a non-holder let go"
    assert store.release(task_id, first.attempt, clean=True) == "{}"
    second = store.start(task_id, "b", "{}")
    assert (second.attempt, second.counted_attempts) == (2, 1)


def test_a_task_between_two_workers_is_cancelled_at_once_and_never_runs_again(store: TaskStore) -> None:
    task_id = new_task(store)
    store.release(task_id, store.start(task_id, "a", "{}").attempt, clean=True)
    assert store.request_cancel(task_id) == TaskStatus.running
    view = store.view(task_id)
    assert view is not None and view.status == TaskStatus.cancelled
    assert store.start(task_id, "b", "{}").found == TaskStatus.cancelled


def test_an_ended_task_holds_no_lease(store: TaskStore, client: redis.Redis) -> None:
    task_id = new_task(store)
    store.fail(task_id, "no", store.start(task_id, "a", "{}").attempt)
    assert client.zscore("tasks:leases", task_id) is None and client.hget(f"task:{task_id}", "request") is None


def test_a_reclaimer_that_dies_before_sending_the_task_on_leaves_it_to_be_reclaimed_again(
    store: TaskStore,
) -> None:
    task_id = new_task(store)
    first = store.start(task_id, "a", '{"prompt": "hi"}')
    lapse(store, task_id)
    assert store.reclaim_lapsed(task_id, send_within_ms=200) == '{"prompt": "hi"}'
    assert store.reclaim_lapsed(task_id) is None, "reclaimed again while its reclaimer may still send it"
    # That reclaimer died here, before sending: the task lapses again and another takes it.
    lapse(store, task_id)
    assert store.reclaim_lapsed(task_id) == '{"prompt": "hi"}'
    store.sent_on(task_id)
    assert task_id not in store.lapsed(limit=10_000), "a task sent on is still watched"
    second = store.start(task_id, "b", '{"prompt": "hi"}')
    assert second.attempt == first.attempt + 1


def test_a_task_started_before_its_reclaimer_confirms_keeps_its_new_lease(store: TaskStore) -> None:
    task_id = new_task(store)
    store.start(task_id, "a", "{}")
    lapse(store, task_id)
    assert store.reclaim_lapsed(task_id) == "{}"
    second = store.start(task_id, "b", "{}")  # the message was taken at once
    store.sent_on(task_id)
    assert store.renew({task_id: second.attempt}) == [] and store.reclaim_lapsed(task_id) is None
    lapse(store, task_id)  # its holder stops renewing: the lease it got at its start is watched still
    assert store.reclaim_lapsed(task_id) == "{}"

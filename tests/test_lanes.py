"""The fair lanes (`core.queue`) against a real redis-server: who is released next, in what share,
and where a waiting task stands. Workers are stood in for by a heartbeat (their slots) and by the
store's own start and finish, which is all the lanes see of them."""

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from core.heartbeats import Heartbeats
from core.protocol import TaskStatus
from core.queue import BACKGROUND, INTERACTIVE, RELEASED_KEY, Lanes, Priority
from core.store import LEASES_KEY, TaskStore
from core.tenants import Tenant

pytestmark = pytest.mark.fast

SHARE = 0.1
SHARES = Priority(SHARE)  # the shares alone: no slot kept, no yielding to active interactive work
KEPT = Priority(SHARE, interactive_slots=1)


def named(name: str, weight: float = 1.0, max_running: int = 0) -> Tenant:
    return Tenant(name, weight, max_queued_tasks=1000, max_running=max_running, requests_per_minute=0, max_streams=10,
                  max_kept_bytes=10**9)


@pytest.fixture
def client(private_redis: str) -> Iterator[redis.Redis]:
    """On a redis-server of its own: no live worker releases from these lanes or adds its slots."""
    client = redis.Redis.from_url(private_redis)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis) -> TaskStore:
    return TaskStore(client, ttl_s=600)


@pytest.fixture
def lanes(client: redis.Redis) -> Lanes:
    return Lanes(client, LEASES_KEY)


def slots(client: redis.Redis, count: int) -> None:
    Heartbeats(client).beat("stand-in@test", ready=True, capabilities={"slots": count})


def queue(store: TaskStore, lanes: Lanes, tenant: Tenant, count: int, task_class: str = INTERACTIVE) -> list[str]:
    ids = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        store.create(task_id)
        lanes.enqueue(task_id, tenant, task_class, {"prompt": task_id})
        ids.append(task_id)
    return ids


def run_one_at_a_time(store: TaskStore, lanes: Lanes, rounds: int) -> list[str]:
    """With one slot: release, start and finish, `rounds` times; the ids in the order released."""
    order: list[str] = []

    def send(task_id: str, request: dict) -> None:
        assert request == {"prompt": task_id}, "the request released is not the one queued"
        order.append(task_id)

    for _ in range(rounds):
        assert lanes.release(send, SHARES) == 1
        started = store.start(order[-1], "w", "{}")
        assert started.attempt == 1
        store.fail(order[-1], "done", started.attempt)
    return order


def test_a_backlog_does_not_hold_back_another_keys_next_task(store: TaskStore, lanes: Lanes, client: redis.Redis) -> None:
    slots(client, 1)
    heavy = queue(store, lanes, named("a"), 300)
    (light,) = queue(store, lanes, named("b"), 1)
    assert lanes.place(light, SHARE) == 1, "b's one task waits behind one of a's, not behind 300"
    order = run_one_at_a_time(store, lanes, 4)
    assert light in order[:2]
    assert [task for task in order if task != light] == heavy[:3], "a's own tasks keep their order"


def test_weights_share_the_slots(store: TaskStore, lanes: Lanes, client: redis.Redis) -> None:
    slots(client, 1)
    heavy = set(queue(store, lanes, named("a", weight=3), 100))
    queue(store, lanes, named("b"), 100)
    order = run_one_at_a_time(store, lanes, 40)
    assert sum(task in heavy for task in order) == 30


def test_background_waits_behind_interactive_but_keeps_its_share(
    store: TaskStore, lanes: Lanes, client: redis.Redis
) -> None:
    slots(client, 1)
    background = set(queue(store, lanes, named("a"), 20, BACKGROUND))
    queue(store, lanes, named("a"), 100, INTERACTIVE)
    order = run_one_at_a_time(store, lanes, 50)
    assert sum(task in background for task in order) == 5  # BACKGROUND_SHARE of the releases, never none


def test_an_idle_class_or_lane_banks_no_credit(store: TaskStore, lanes: Lanes, client: redis.Redis) -> None:
    """Work that arrives after others ran alone gets its share from then on, not a catch-up burst."""
    slots(client, 1)
    queue(store, lanes, named("a"), 60)
    run_one_at_a_time(store, lanes, 30)
    late = set(queue(store, lanes, named("b"), 20) + queue(store, lanes, named("c"), 20, BACKGROUND))
    order = run_one_at_a_time(store, lanes, 20)
    counts = Counter(task in late for task in order)
    assert 9 <= counts[True] <= 12, counts  # b's half of the interactive releases, plus c's tenth


def test_a_key_at_its_running_cap_waits_and_frees_its_slots_to_others(
    store: TaskStore, lanes: Lanes, client: redis.Redis
) -> None:
    slots(client, 4)
    capped = named("a", max_running=1)
    first, _ = queue(store, lanes, capped, 2)
    others = queue(store, lanes, named("b"), 5)
    sent: list[str] = []
    assert lanes.release(lambda task_id, _: sent.append(task_id), SHARES) == 4
    assert sent.count(first) == 1 and set(sent) - {first} <= set(others)
    assert lanes.counts("a").running == 1 and lanes.counts("a").waiting == 1
    started = store.start(first, "w", "{}")
    store.fail(first, "done", started.attempt)
    assert lanes.counts("a").running == 0


def test_a_cancelled_task_leaves_its_lane_and_a_lost_release_is_sent_again(
    store: TaskStore, lanes: Lanes, client: redis.Redis
) -> None:
    cancelled, kept = queue(store, lanes, named("a"), 2)
    assert store.request_cancel(cancelled) == TaskStatus.queued
    assert lanes.counts("a").waiting == 1 and lanes.place(kept, SHARE) == 0
    slots(client, 1)
    assert lanes.release(lambda *_: None, SHARES) == 1  # a sender that died: the message never went
    client.zadd(RELEASED_KEY, {kept: 0})  # as if RESEND_AFTER_MS had passed
    sent: list[str] = []
    assert lanes.resend_overdue(lambda task_id, _: sent.append(task_id)) == 1 and sent == [kept]
    assert lanes.resend_overdue(lambda task_id, _: sent.append(task_id)) == 0, "sent again before its time"


def test_background_work_leaves_the_kept_slots_to_interactive_requests(store: TaskStore, lanes: Lanes,
                                                                        client: redis.Redis) -> None:
    slots(client, 4)
    batch = queue(store, lanes, named("a"), 10, BACKGROUND)
    sent: list[str] = []
    assert lanes.release(lambda task_id, _: sent.append(task_id), KEPT) == 3  # one slot kept
    assert set(sent) <= set(batch)
    asked = queue(store, lanes, named("b"), 2)
    assert lanes.release(lambda task_id, _: sent.append(task_id), KEPT) == 1
    assert sent[-1] in asked  # the kept slot, at once
    for task_id in sent:  # all four end: the waiting interactive task first, then the batch, a slot kept
        store.fail(task_id, "done", store.start(task_id, "w", "{}").attempt)
    assert lanes.release(lambda task_id, _: sent.append(task_id), KEPT) == 3
    assert sent[-3] == asked[1] and set(sent[-2:]) <= set(batch)


def test_a_fleet_of_no_more_slots_than_kept_still_runs_background_work(store: TaskStore, lanes: Lanes,
                                                                       client: redis.Redis) -> None:
    slots(client, 1)
    queue(store, lanes, named("a"), 2, BACKGROUND)
    assert lanes.release(lambda *_: None, KEPT) == 1


def test_background_work_holds_its_share_of_the_slots_while_interactive_work_is_active(
    store: TaskStore, lanes: Lanes, client: redis.Redis
) -> None:
    slots(client, 8)
    yielding = Priority(SHARE, interactive_slots=1, active_share=0.25, active_ms=300)
    batch = queue(store, lanes, named("a"), 30, BACKGROUND)
    sent: list[str] = []

    def release() -> int:
        return lanes.release(lambda task_id, _: sent.append(task_id), yielding)

    def end(task_ids: list[str]) -> None:
        for task_id in task_ids:
            store.fail(task_id, "done", store.start(task_id, "w", "{}").attempt)

    assert release() == 7  # no interactive work yet: all but the kept slot
    asked = queue(store, lanes, named("b"), 1)
    assert release() == 1 and sent[-1] == asked[0]
    end(sent)
    assert release() == 2, "interactive work is active: a quarter of the slots"
    end(sent[-1:])
    assert release() == 1 and set(sent[-3:]) <= set(batch)
    gone = sent[-1]
    client.delete(f"task:{gone}")  # a record gone without its task ending no longer holds a slot
    assert release() == 1
    client.zadd(RELEASED_KEY, {gone: 0})  # and the overdue scan drops it from `released`
    assert lanes.resend_overdue(lambda *_: None) == 0
    time.sleep(0.35)
    assert release() == 5, "the interactive work went quiet: all but the kept slot again"

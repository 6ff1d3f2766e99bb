"""Many tenants, one fleet, on real processes: a redis-server, two workers of one slot and an API
with two named keys. One key's backlog does not hold back the other's next task, its 429s are its
own, background work finishes under interactive load, and the lanes keep count across a worker's
SIGKILL and a Redis restart."""

import json
from collections.abc import Iterator

import httpx
import pytest

from core.protocol import TaskStatus, TaskView
from devstack.processes import Stack, wait_until
from tests.helpers import poll_until, poll_until_finished

KEYS = {"a": "key-of-a", "b": "key-of-b"}
A_QUEUED_LIMIT = 250
SHORT = {"prompt": "Tell me about lighthouses.", "temperature": 0, "max_new_tokens": 32}
P = "queued_llama_"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(
        tmp_path_factory.mktemp("tenants"), stack_env,
        API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
        KEY_LIMITS=json.dumps({"a": {"max_queued_tasks": A_QUEUED_LIMIT}}),
        WORKER_CONCURRENCY="1", MAX_STREAMS_PER_KEY="2",
    )
    running.start_redis()
    running.start_worker("worker1")
    running.start_worker("worker2")
    running.start_api()
    running.wait_healthy()
    yield running
    running.down()


def as_key(stack: Stack, name: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=30, headers={"Authorization": f"Bearer {KEYS[name]}"})


def gauge(stack: Stack, name: str, key: str) -> float:
    for line in httpx.get(f"{stack.url}/metrics").text.splitlines():
        if line.startswith(f"{P}{name}{{") and f'key="{key}"' in line:
            return float(line.split()[-1])
    return 0.0


def cancel_all(client: httpx.Client, task_ids: list[str]) -> None:
    for task_id in task_ids:
        client.delete(f"/task/{task_id}")


def test_one_keys_backlog_and_429s_leave_another_keys_next_task_alone(stack: Stack) -> None:
    with as_key(stack, "a") as a, as_key(stack, "b") as b:
        answers = [a.post("/generate", json=SHORT) for _ in range(300)]
        accepted = [r.json()["task_id"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code == 429]
        try:
            assert refused and "for key 'a'" in refused[0].json()["detail"] and refused[0].headers["Retry-After"]
            assert len(accepted) + len(refused) == 300
            assert gauge(stack, "key_requests_waiting", "a") > 100

            sent = b.post("/generate", json=SHORT)
            assert sent.status_code == 202, "a's full lane refused b"
            light = sent.json()["task_id"]
            assert TaskView.model_validate(b.get(f"/task/{light}").json()).queue_position in (0, 1, 2, None)
            final, _ = poll_until_finished(b, light)
            assert final.status == TaskStatus.succeeded and final.timings is not None
            generations = [poll_until_finished(a, task_id)[0].timings for task_id in accepted[:4]]
            longest = max(t.total_s - t.queued_s for t in generations if t is not None)
            # The next slot frees within one generation; the release that fills it comes at once
            # (or at the next second's tick).
            assert final.timings.queued_s < longest + 1.5, (final.timings.queued_s, longest)
            assert gauge(stack, "key_requests_waiting", "a") > 100, "b waited for a's backlog"
        finally:
            cancel_all(a, accepted)


def test_background_work_waits_behind_interactive_work_but_finishes_under_it(stack: Stack) -> None:
    with as_key(stack, "a") as a, as_key(stack, "b") as b:
        backlog = [a.post("/generate", json=SHORT).json()["task_id"] for _ in range(60)]
        try:
            created = b.post("/v1/responses", json={"model": MODEL, "input": "Say hi.", "background": True,
                                                    "max_output_tokens": 16, "temperature": 0})
            assert created.status_code == 200, created.text
            response_id = created.json()["id"]
            wait_until(lambda: b.get(f"/v1/responses/{response_id}").json()["status"] in ("completed", "incomplete"),
                       120, "the background response to finish")
            assert gauge(stack, "key_requests_waiting", "a") > 20, "it waited for the whole backlog"
        finally:
            cancel_all(a, backlog)


def test_a_keys_streams_beyond_its_limit_are_429_and_its_bad_metadata_a_400(stack: Stack) -> None:
    with as_key(stack, "b") as b, as_key(stack, "a") as a:
        long = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 1000}
        sent = b.post("/generate", json=long)
        assert sent.status_code == 202, sent.text
        task_id = sent.json()["task_id"]
        poll_until(b, task_id, lambda v: bool(v.chunks))
        with b.stream("GET", f"/task/{task_id}/events") as first, b.stream("GET", f"/task/{task_id}/events") as second:
            assert first.status_code == second.status_code == 200
            third = b.get(f"/task/{task_id}/events")
            assert third.status_code == 429 and third.headers["Retry-After"], third.text
            streamed = b.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
            assert streamed.status_code == 429 and "streams" in streamed.json()["error"]["message"]
            with a.stream("GET", f"/task/{task_id}/events") as others:
                assert others.status_code == 404, "a sees none of b's tasks; its own streams are not b's"
        b.delete(f"/task/{task_id}")
        wait_until(lambda: b.get(f"/task/{task_id}/events").status_code == 200, 10, "b's streams to be given back")

        big = b.post("/v1/responses", json={"model": MODEL, "input": "Hi", "metadata": {"note": "x" * 1_000_000}})
        assert big.status_code == 400 and big.json()["error"]["param"].startswith("metadata"), big.text


def test_the_lanes_lose_nothing_and_keep_count_across_a_worker_kill_and_a_redis_restart(stack: Stack) -> None:
    with as_key(stack, "a") as a, as_key(stack, "b") as b:
        tasks = [(a, a.post("/generate", json=SHORT).json()["task_id"]) for _ in range(12)]
        tasks += [(b, b.post("/generate", json=SHORT).json()["task_id"]) for _ in range(4)]
        poll_until(a, tasks[0][1], lambda v: bool(v.chunks))
        stack.stop_worker("worker2", kill=True)
        assert stack.redis is not None
        stack.redis.terminate()  # SIGTERM: Redis writes its append-only file, lanes and all
        stack.redis.wait(timeout=30)
        stack.start_redis()
        stack.start_worker("worker2")
        stack.wait_healthy()
        for client, task_id in tasks:
            final, seen = poll_until_finished(client, task_id)
            assert final.status == TaskStatus.succeeded, final.error
            assert "".join(c.text for v in seen for c in v.chunks) == final.text, "a chunk was written twice"
        for key in KEYS:
            assert gauge(stack, "key_requests_waiting", key) == 0
            wait_until(lambda key=key: gauge(stack, "key_requests_running", key) == 0, 10, f"{key}'s running count")

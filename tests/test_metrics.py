"""GET /metrics against a stack of its own: scraped before and after real tasks, parsed with
prometheus_client's own parser, and every count moved by exactly what was done."""

import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from core.protocol import TaskStatus, TaskView
from core.store import TaskStore
from devstack.processes import Stack, wait_until
from tests.extra_api import extra_api
from tests.helpers import poll_until, poll_until_finished, submit
from core.queue import QUEUE, send_generate

MODEL = "SmolLM2-135M-Instruct"
P = "queued_llama_"
LONG = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 400}
SHORT = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 4}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One queued task at most, so that a 429 is easy to cause."""
    running = Stack(tmp_path_factory.mktemp("metrics"), stack_env, QUANTIZATION="none", MAX_QUEUED_TASKS="1")
    yield running.up()
    running.down()


def scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model": MODEL, **labels}.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def send_unreadable(stack: Stack) -> str:
    """A task whose payload the worker cannot read: it ends `failed`."""
    task_id = str(uuid.uuid4())
    TaskStore(redis.Redis.from_url(stack.redis_url), ttl_s=600).create(task_id)
    sender = Celery(broker=stack.redis_url)
    sender.conf.update(task_serializer="json", accept_content=["json"], task_default_queue=QUEUE)
    send_generate(sender, {"prompt": "hi", "max_new_tokens": "many"}, task_id)
    return task_id


def test_metrics_count_exactly_what_was_done(stack: Stack) -> None:
    client = httpx.Client(base_url=stack.url, timeout=30)
    before = scrape(stack.url)

    finished: list[TaskView] = [poll_until_finished(client, submit(client, **SHORT))[0] for _ in range(2)]
    running = submit(client, **LONG)
    poll_until(client, running, lambda v: bool(v.chunks))
    queued = submit(client, **SHORT)  # waits behind the running one: the queue is now full
    assert client.post("/generate", json=SHORT).status_code == 429
    assert client.delete(f"/task/{queued}").status_code == 202  # cancelled while queued: no result
    assert client.delete(f"/task/{running}").status_code == 202  # stops with its text and figures
    finished.append(poll_until_finished(client, running)[0])
    failed = send_unreadable(stack)
    assert poll_until_finished(client, failed)[0].status == TaskStatus.failed
    assert client.post("/generate", json={"prompt": ""}).status_code == 422
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "n": 3}).status_code == 400
    assert client.post("/generate", content=b"x" * (2 * 1024 * 1024)).status_code == 413
    wait_until(lambda: moved(before, scrape(stack.url), f"{P}request_finished_total", status="failed",
                             finish_reason="none") == 1, 30, "the failure to be counted")
    after = scrape(stack.url)

    assert [v.status for v in finished] == [TaskStatus.succeeded] * 2 + [TaskStatus.cancelled]
    assert moved(before, after, f"{P}request_finished_total", status="succeeded", finish_reason="length") == 2
    assert moved(before, after, f"{P}request_finished_total", status="cancelled", finish_reason="cancelled") == 2
    assert moved(before, after, f"{P}request_finished_total", status="failed", finish_reason="none") == 1
    assert moved(before, after, f"{P}prompt_tokens_total") == sum(v.usage.prompt_tokens for v in finished if v.usage)
    assert moved(before, after, f"{P}generation_tokens_total") == sum(
        v.usage.completion_tokens for v in finished if v.usage
    )
    for histogram in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_generation_tokens_per_second"):
        assert moved(before, after, f"{P}{histogram}_count") == 3, histogram
        assert moved(before, after, f"{P}{histogram}_bucket", le="+Inf") == 3, histogram
    latency = sum(v.timings.total_s for v in finished if v.timings)
    assert moved(before, after, f"{P}e2e_request_latency_seconds_sum") == pytest.approx(latency)
    for code in ("400", "413", "422", "429"):
        assert moved(before, after, f"{P}request_rejected_total", key="shared", code=code) == 1, code
    assert moved(before, after, f"{P}request_admitted_total", key="shared") == 4  # 2 finished, running, queued
    assert moved(before, after, f"{P}request_takeovers_total") == 0
    assert after[(f"{P}key_requests_waiting", (("key", "shared"), ("model", MODEL)))] == 0
    assert after[(f"{P}key_requests_running", (("key", "shared"), ("model", MODEL)))] == 0
    assert after[(f"{P}num_requests_waiting", (("model", MODEL),))] == 0
    assert after[(f"{P}num_requests_running", (("model", MODEL),))] == 0
    assert after[(f"{P}workers_online", (("model", MODEL),))] == 1


def test_metrics_need_no_api_key(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    with extra_api(stack.env, tmp_path_factory.mktemp("keyed"), {"API_KEYS": "secret"}) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.post(f"{url}/generate", json=SHORT).status_code == 401

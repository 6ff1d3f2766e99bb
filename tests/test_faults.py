"""Nothing lost: real processes killed and restarted under a running stack of its own.

The stack here has a short time limit, a short Redis retry window and at most two attempts;
its one worker is replaced when a test kills it. (test_takeover.py has two workers and the
default lease settings, for the takeover bound.)
"""

import signal
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest
import redis
from celery import Celery
from openai.types.responses import ResponseStreamEvent

from core.protocol import GenerateRequest, TaskStatus, TaskView
from core.store import TaskStore
from devstack.processes import Stack, wait_until
from tests.blackhole import BlackHoleProxy
from tests.extra_api import extra_api
from core.queue import QUEUE, send_generate
from tests.helpers import poll_until_finished, submit

# In every prompt here, so that the last test can check that no log holds it, failures included.
SECRET_NAME = f"Zorblax-{uuid.uuid4().hex[:8]}"
STORY = f"Write a long story about a lighthouse keeper named {SECRET_NAME}."
TIME_LIMIT_S = 6
REDIS_RETRY_S = 5  # a worker rides out a Redis restart shorter than this, and requeues its task past it
VISIBILITY_TIMEOUT_S = 2 * TIME_LIMIT_S + 10
TAKEOVER_S = 90  # a new worker loads its model, then the lease lapses and it takes the task over


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(
        tmp_path_factory.mktemp("faults"),
        stack_env,
        QUANTIZATION="none",
        TASK_TIME_LIMIT_S=str(TIME_LIMIT_S),
        MAX_ATTEMPTS="2",
        WORKER_REDIS_RETRY_S=str(REDIS_RETRY_S),
    )
    yield running.up()
    running.down()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


def view(client: httpx.Client, task_id: str) -> TaskView:
    return TaskView.model_validate(client.get(f"/task/{task_id}").json())


def replace_worker(stack: Stack) -> None:
    """SIGKILL the worker mid-task (no warm shutdown, no ack) and start a fresh one."""
    stack.stop_worker(the_worker(stack), kill=True)
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")


def wait_for_attempt(client: httpx.Client, task_id: str, attempt: int) -> None:
    wait_until(lambda: (v := view(client, task_id)).attempt == attempt and bool(v.text), TAKEOVER_S,
               f"attempt {attempt} of {task_id} to stream")


def the_worker(stack: Stack) -> str:
    (name,) = stack.workers
    return name


def test_a_task_that_keeps_killing_its_worker_fails_after_max_attempts(stack: Stack, client: httpx.Client) -> None:
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
    for attempt in (1, 2):
        wait_for_attempt(client, task_id, attempt)
        replace_worker(stack)
    wait_until(lambda: view(client, task_id).status == TaskStatus.failed, TAKEOVER_S, "the task to give up")
    assert "gave up after 2 attempts" in (view(client, task_id).error or "")

    after, _ = poll_until_finished(client, submit(client, prompt="Hi", temperature=0, max_new_tokens=8))
    assert after.status == TaskStatus.succeeded and after.text


def test_time_limit_ends_a_task_with_its_partial_text(client: httpx.Client) -> None:
    final, seen = poll_until_finished(client, submit(client, prompt=STORY, temperature=0, max_new_tokens=1000))
    assert final.status == TaskStatus.succeeded and final.finish_reason == "timeout"
    assert final.text and "".join(c.text for v in seen for c in v.chunks) == final.text
    # The deadline is set as the attempt starts, generation_s a moment later: it may fall short by that.
    assert final.timings and TIME_LIMIT_S - 0.1 <= final.timings.generation_s < TIME_LIMIT_S + 5


def send_raw(stack: Stack, task_id: str, payload: dict) -> None:
    """A Celery message sent by hand, as the API would send it (or as no API would)."""
    sender = Celery(broker=stack.redis_url)
    sender.conf.update(task_serializer="json", accept_content=["json"], task_default_queue=QUEUE)
    send_generate(sender, payload, task_id)


def test_a_task_the_worker_cannot_run_fails_with_a_message_and_the_worker_goes_on(
    stack: Stack, client: httpx.Client
) -> None:
    task_id = str(uuid.uuid4())
    TaskStore(redis.Redis.from_url(stack.redis_url), ttl_s=600).create(task_id)
    send_raw(stack, task_id, {"prompt": STORY, "max_new_tokens": "many"})

    failed, _ = poll_until_finished(client, task_id)
    assert failed.status == TaskStatus.failed and "could not read this task" in (failed.error or "")
    after, _ = poll_until_finished(client, submit(client, prompt="Hi", temperature=0, max_new_tokens=8))
    assert after.status == TaskStatus.succeeded


def restart_redis(stack: Stack, client: httpx.Client, down_s: float = 0) -> None:
    """SIGTERM (Redis writes its append-only file), check the API says 503 meanwhile, start it again
    (after `down_s`: an outage of that length is the point of some tests)."""
    assert stack.redis is not None
    stack.redis.terminate()
    stack.redis.wait(timeout=30)
    for response in (client.post("/generate", json={"prompt": "hi"}), client.get(f"/task/{uuid.uuid4()}")):
        assert response.status_code == 503 and "Redis" in response.json()["detail"]
    time.sleep(down_s)
    stack.start_redis()


def test_redis_restart_loses_no_queued_task_or_result(stack: Stack, client: httpx.Client) -> None:
    finished, _ = poll_until_finished(client, submit(client, prompt="Hi", temperature=0, max_new_tokens=8))

    restart_redis(stack, client)
    stack.wait_healthy()
    after, _ = poll_until_finished(client, submit(client, prompt="Hi", temperature=0, max_new_tokens=8))
    assert after.status == TaskStatus.succeeded, "the worker did not reconnect"

    stack.stop_worker(the_worker(stack))
    queued = submit(client, prompt="What is the capital of France?", temperature=0, max_new_tokens=12)
    restart_redis(stack, client)
    assert view(client, queued).status == TaskStatus.queued
    assert view(client, finished.task_id).text == finished.text
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")

    done, _ = poll_until_finished(client, queued)
    assert done.status == TaskStatus.succeeded and done.text


def test_redis_restart_mid_generation_loses_nothing(stack: Stack, client: httpx.Client) -> None:
    """The worker's writes wait for Redis to come back (WORKER_REDIS_RETRY_S), and the generation goes on."""
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=32)
    wait_for_attempt(client, task_id, 1)
    restart_redis(stack, client)

    final, seen = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded and final.attempt == 1, final.error
    assert final.text and "".join(c.text for v in seen for c in v.chunks) == final.text


def test_redis_away_longer_than_the_worker_waits_requeues_the_task(stack: Stack, client: httpx.Client) -> None:
    """Past WORKER_REDIS_RETRY_S the worker gives the task back to the queue instead of acknowledging it.

    The task goes on soon after Redis is back (its lease lapsed meanwhile; the requeued message
    and the takeover, whichever comes first, run it), well before the visibility timeout would
    have restored it (without the requeue it was acknowledged and never ran again).
    """
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
    wait_for_attempt(client, task_id, 1)
    delivered = time.monotonic()
    restart_redis(stack, client, down_s=REDIS_RETRY_S + 3)
    wait_for_attempt(client, task_id, 2)
    assert time.monotonic() - delivered < VISIBILITY_TIMEOUT_S - 2, "it came back by the visibility timeout"

    final, seen = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded and final.attempt == 2, final.error
    assert "".join(c.text for v in seen for c in v.chunks) == final.text


def test_a_second_delivery_of_a_running_task_is_not_run(stack: Stack, client: httpx.Client) -> None:
    """What a broker blip can do (celery #5935): the same task delivered to a second worker while the first runs it.

    The first holds the task's lease, so the second delivery is dropped without running (it used
    to restart the answer in a new attempt): one attempt, its whole text, one result.
    """
    stack.start_worker("second")
    try:
        wait_until(lambda: "2 ready" in client.get("/health").json()["workers"]["detail"], 120, "a second worker")
        body = GenerateRequest(prompt=STORY, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=48)
        task_id = submit(client, **body.model_dump(exclude_none=True))
        wait_for_attempt(client, task_id, 1)
        first_worker = view(client, task_id).worker
        send_raw(stack, task_id, body.model_dump(mode="json"))
        final, seen = poll_until_finished(client, task_id)
        logs = "".join(log.read_text() for log in stack.logs.glob("*.log"))
    finally:
        stack.stop_worker("second")  # the other tests expect the stack's one worker
    assert final.status == TaskStatus.succeeded and final.attempt == 1 and final.worker == first_worker
    assert f"task {task_id}: not run (held)" in logs
    assert "".join(c.text for v in seen for c in v.chunks) == final.text


def test_redis_refusing_writes_mid_generation_pauses_the_task_and_loses_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    """Out of memory (or READONLY after a failover) is not a lost connection, but passes like one:
    it used to fail the write, then the failure's own write, and leave the task `running` for a day."""
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
    wait_for_attempt(client, task_id, 1)
    admin = redis.Redis.from_url(stack.redis_url)
    admin.config_set("maxmemory", 1)  # with noeviction, every write is now refused
    try:
        time.sleep(REDIS_RETRY_S / 2)
        assert view(client, task_id).status == TaskStatus.running
    finally:
        admin.config_set("maxmemory", 0)
    final, seen = poll_until_finished(client, task_id, timeout_s=60)
    assert final.status == TaskStatus.succeeded and final.attempt == 1, final.error
    assert "".join(c.text for v in seen for c in v.chunks) == final.text


def test_a_redis_error_that_will_not_pass_fails_the_task_visibly(stack: Stack, client: httpx.Client) -> None:
    """A key of the wrong type (something else wrote there) fails the task with the error, never silently."""
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=400)
    wait_for_attempt(client, task_id, 1)
    admin = redis.Redis.from_url(stack.redis_url)
    admin.delete(f"task:{task_id}:chunks")
    admin.set(f"task:{task_id}:chunks", "not a stream")  # until the worker fails the task, GET answers 503
    wait_until(lambda: admin.hget(f"task:{task_id}", "status") != b"running", 60, "the worker to end the task")
    final = view(client, task_id)
    assert final.status == TaskStatus.failed and "WRONGTYPE" in (final.error or ""), final
    after, _ = poll_until_finished(client, submit(client, prompt="Hi", temperature=0, max_new_tokens=4))
    assert after.status == TaskStatus.succeeded


def test_a_half_open_connection_does_not_hang_the_task(stack: Stack, client: httpx.Client) -> None:
    """Every connection of the worker goes silent mid-generation, without being closed: with no
    socket timeout its next write waited forever; now it times out, reconnects, and goes on."""
    proxy = BlackHoleProxy(urlparse(stack.redis_url).port or 6379)
    stack.stop_worker(the_worker(stack))
    stack.env["REDIS_URL"], real_url = f"redis://127.0.0.1:{proxy.port}/0", stack.redis_url
    try:
        stack.start_worker("proxied")
        stack.wait_healthy()
        task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
        wait_for_attempt(client, task_id, 1)
        proxy.swallow()
        final, seen = poll_until_finished(client, task_id, timeout_s=90)
    finally:
        stack.env["REDIS_URL"] = real_url
        stack.stop_worker("proxied", kill=True)
        proxy.close()
        stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")
        stack.wait_healthy()
    assert final.status == TaskStatus.succeeded and final.attempt == 1, final.error
    assert "".join(c.text for v in seen for c in v.chunks) == final.text


def test_a_half_open_connection_does_not_hang_the_apis_submissions(stack: Stack, tmp_path: Path) -> None:
    """The API's connections, Celery's publishing one included, go silent: kombu's had no socket
    timeout, so every later POST /generate waited forever on it; now it times out, reconnects
    and queues the task."""
    proxy = BlackHoleProxy(urlparse(stack.redis_url).port or 6379)
    try:
        with extra_api(stack.env, tmp_path, {"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}) as url:
            first = httpx.post(f"{url}/generate", json={"prompt": STORY, "max_new_tokens": 2}, timeout=30)
            assert first.status_code == 202, first.text
            proxy.swallow()
            answers = []
            for _ in range(3):  # a refused one (503, while a timed-out connection is replaced) may come first
                answers.append(httpx.post(f"{url}/generate", json={"prompt": STORY, "max_new_tokens": 2}, timeout=30))
                if answers[-1].status_code == 202:
                    break
    finally:
        proxy.close()
    assert [a.status_code for a in answers][-1] == 202, [(a.status_code, a.text) for a in answers]
    assert all(a.status_code in (202, 503) for a in answers)


def test_api_restart_affects_no_task(stack: Stack, client: httpx.Client) -> None:
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=32)
    assert stack.api is not None
    stack.api.send_signal(signal.SIGKILL)
    stack.api.wait()
    stack.start_api()
    stack.wait_healthy()
    final, _ = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded and final.text


MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def sdk(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def read_until_text(stream: Iterable[ResponseStreamEvent], deltas: int) -> list[ResponseStreamEvent]:
    """The events up to and including the `deltas`-th piece of text."""
    events: list[ResponseStreamEvent] = []
    for event in stream:
        events.append(event)
        if sum(e.type == "response.output_text.delta" for e in events) == deltas:
            return events
    raise AssertionError(f"the stream ended before {deltas} deltas: {[e.type for e in events]}")


def text_of(events: Iterable[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def assert_numbered_once(events: list[ResponseStreamEvent]) -> None:
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), f"an event was repeated or came back in time: {numbers}"


def test_a_background_response_survives_the_api_killed_and_resumes(stack: Stack, sdk: openai.OpenAI) -> None:
    """The issue's "done when": kill -9 of the API mid-answer, a new API, and the SDK resumes exactly."""
    stream = sdk.responses.create(model=MODEL, input=STORY, temperature=0, max_output_tokens=32, background=True,
                                  stream=True)
    seen = read_until_text(stream, 2)
    assert stack.api is not None
    stack.api.send_signal(signal.SIGKILL)
    stack.api.wait()
    stream.close()
    stack.start_api()
    stack.wait_healthy()

    rest = list(sdk.responses.retrieve(seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number))
    assert_numbered_once(seen + rest)
    final = sdk.responses.retrieve(seen[0].response.id)
    assert rest[-1].type == "response.incomplete" and text_of(seen + rest) == final.output_text


def test_a_response_stream_rides_out_a_redis_restart(stack: Stack, client: httpx.Client, sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model=MODEL, input=STORY, temperature=0, max_output_tokens=32, background=True,
                                  stream=True)
    seen = read_until_text(stream, 1)
    restart_redis(stack, client)
    rest = list(stream)
    assert_numbered_once(seen + rest)
    final = sdk.responses.retrieve(seen[0].response.id)
    assert rest[-1].type == "response.incomplete" and text_of(seen + rest) == final.output_text


def test_logs_hold_no_prompt(stack: Stack, client: httpx.Client) -> None:
    """Last in this module: every test before it sent SECRET_NAME in its prompts, down every path
    that logs (a killed worker, a task given up, one the worker could not read, a requeue, Redis
    refusing writes, a duplicate delivery, a time limit), and none of that may reach a log."""
    poll_until_finished(client, submit(client, prompt=f"Repeat: {SECRET_NAME}", temperature=0, max_new_tokens=4))
    logs = list(Path(stack.logs).glob("*.log"))
    assert len(logs) >= 4, [log.name for log in logs]
    for log in logs:
        assert SECRET_NAME not in log.read_text(errors="replace"), f"{log.name} holds the prompt"

"""Takeover: a worker that dies, freezes or stops mid-answer, and another that goes on with it.

A stack of its own with two workers and the default lease settings, so that the bounds checked
here are the ones a user gets, once on each engine (vLLM eager: compiling takes minutes). Answers are greedy (temperature 0): an
answer taken over must end exactly as the same request's uninterrupted answer, which is asked
for first. llama.cpp answers about 20 times as fast as transformers here and vLLM about 5 times, so
their answers are longer, to be still running when the worker is stopped.
"""

import json
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from core.protocol import TaskStatus, TaskView
from core.settings import Settings
from core.store import chunks_key
from devstack.processes import Stack, wait_until
from tests.helpers import poll_until, poll_until_finished, submit

TAKEOVER_BOUND_S = 15  # the goal: from a worker's death to another worker generating
PROMPT = "Write a long story about a lighthouse keeper."
TOKENS = {"llamacpp": 1000, "transformers": 96, "vllm": 300}
SETTINGS = {"vllm": {"KV_CACHE_TOKENS": "4096", "VLLM_ARGS": "--enforce-eager"}}
STALL_S = 5  # GENERATION_STALL_S here: an engine step takes milliseconds
MODEL = "SmolLM2-135M-Instruct"


def on(*engines: str) -> pytest.MarkDecorator:
    """The engines a test runs on: a stack each, shared by the tests of that engine. The kill on every
    engine (the issue's bound); the others where they test something of the engine's own, since a
    vLLM worker takes half a minute to start."""
    return pytest.mark.parametrize("engine", engines, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def body(engine: str) -> dict:
    return {"prompt": PROMPT, "temperature": 0, "max_new_tokens": TOKENS[engine]}


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp(f"takeover-{engine}"), stack_env, QUANTIZATION="none", ENGINE=engine,
                    GENERATION_STALL_S=str(STALL_S), **SETTINGS.get(engine, {}))
    running.start_redis()
    running.start_worker("first")
    running.start_worker("second")
    running.start_api()
    running.wait_healthy()
    yield running
    running.down()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        wait_until(lambda: "2 ready" in c.get("/health").json()["workers"]["detail"], 300, "two workers")
        yield c


@pytest.fixture(scope="module")
def reference(stack: Stack, body: dict) -> TaskView:
    """The uninterrupted answer to `body`."""
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        final, _ = poll_until_finished(c, submit(c, **body))
    assert final.status == TaskStatus.succeeded and final.attempt == 1
    return final


def holder(stack: Stack, view: TaskView) -> str:
    """The stack's name for the worker process that runs the task (Celery's is `<name>@<host>`)."""
    name = (view.worker or "").split("@")[0]
    assert name in stack.workers, (name, list(stack.workers))
    return name


def wait_for_attempt(stack: Stack, task_id: str, attempt: int, timeout_s: float) -> float:
    """Seconds until a chunk written by `attempt` is in the task's stream."""
    admin = redis.Redis.from_url(stack.redis_url)
    started = time.monotonic()

    def written() -> bool:
        last = admin.xrevrange(chunks_key(task_id), count=1)
        return bool(last) and last[0][1].get(b"attempt") == str(attempt).encode()

    wait_until(written, timeout_s, f"attempt {attempt} of {task_id} to write")
    return time.monotonic() - started


def takeovers_counted(client: httpx.Client) -> float:
    """The fleet's takeover counter, as Prometheus reads it from /metrics."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    samples = [s for f in families for s in f.samples if s.name == "queued_llama_request_takeovers_total"]
    return sum(s.value for s in samples)


def streaming(client: httpx.Client, task_id: str) -> TaskView:
    return poll_until(client, task_id, lambda v: len(v.chunks) >= 3)


def assert_one_answer(before: TaskView, seen: list[TaskView], final: TaskView, reference: TaskView) -> None:
    """The answer went on from where it stopped: the reader who kept its cursor saw every chunk once,
    and the whole is the uninterrupted answer, with the whole answer's usage."""
    assert final.status == TaskStatus.succeeded and final.attempt == 2, final
    assert "".join(c.text for v in [before, *seen] for c in v.chunks) == final.text, "a chunk repeated or lost"
    assert final.text == reference.text, "the answer did not go on where it stopped"
    assert final.usage == reference.usage and final.finish_reason == reference.finish_reason


@on("llamacpp", "transformers", "vllm")
def test_a_killed_worker_is_taken_over_within_the_bound_and_the_answer_goes_on(
    stack: Stack, client: httpx.Client, reference: TaskView, body: dict
) -> None:
    takeovers = takeovers_counted(client)
    task_id = submit(client, **body)
    before = streaming(client, task_id)
    stack.stop_worker(holder(stack, before), kill=True)

    assert wait_for_attempt(stack, task_id, 2, timeout_s=60) < TAKEOVER_BOUND_S
    final, seen = poll_until_finished(client, task_id, after=before.cursor)
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")
    assert_one_answer(before, seen, final, reference)
    assert takeovers_counted(client) == takeovers + 1


# A list long enough to be still running when its worker is killed, on each engine's speed.
LIST_ITEMS = {"llamacpp": 50, "transformers": 6, "vllm": 20}


def long_list(items: int) -> dict:
    line = {"type": "string", "maxLength": 40}
    return {"type": "object", "properties": {"lines": {"type": "array", "items": line, "minItems": items,
                                                       "maxItems": items}},
            "required": ["lines"], "additionalProperties": False}


@on("llamacpp", "transformers", "vllm")
def test_a_constrained_answer_killed_mid_way_goes_on_inside_its_schema(
    stack: Stack, client: httpx.Client, engine: str
) -> None:
    """The grammar's state is rebuilt from the published tokens: the answer taken over still validates
    and is the uninterrupted one."""
    schema = long_list(LIST_ITEMS[engine])
    constrained = {"prompt": "List the lines of a poem about the sea.", "temperature": 0, "max_new_tokens": 1000,
                   "json_schema": schema}
    whole, _ = poll_until_finished(client, submit(client, **constrained))
    assert whole.status == TaskStatus.succeeded and whole.finish_reason == "eos", whole.text
    task_id = submit(client, **constrained)
    before = streaming(client, task_id)
    stack.stop_worker(holder(stack, before), kill=True)
    final, seen = poll_until_finished(client, task_id, after=before.cursor)
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")
    assert_one_answer(before, seen, final, whole)
    jsonschema.validate(json.loads(final.text), schema)


@on("llamacpp", "transformers")
def test_a_frozen_worker_is_taken_over_and_its_late_writes_are_dropped(
    stack: Stack, client: httpx.Client, reference: TaskView, body: dict
) -> None:
    task_id = submit(client, **body)
    before = streaming(client, task_id)
    frozen = holder(stack, before)
    stack.workers[frozen].send_signal(signal.SIGSTOP)
    try:
        wait_for_attempt(stack, task_id, 2, timeout_s=60)
    finally:
        stack.workers[frozen].send_signal(signal.SIGCONT)
    final, seen = poll_until_finished(client, task_id, after=before.cursor)
    assert_one_answer(before, seen, final, reference)
    log = stack.logs / f"{frozen}.log"
    superseded = f"task {task_id}: another"  # its lease thread or its generation, whichever notices first
    wait_until(lambda: superseded in log.read_text(), 30, "the frozen worker to learn it was superseded")
    entries = redis.Redis.from_url(stack.redis_url).xrange(chunks_key(task_id))
    attempts = [int(fields[b"attempt"]) for _, fields in entries if b"attempt" in fields]
    assert attempts == sorted(attempts), "the frozen worker wrote after the takeover"


@on("llamacpp", "vllm")  # transformers runs inside the worker: nothing to stop apart from it (the freeze)
def test_a_worker_whose_engine_hangs_is_taken_over_and_its_late_writes_are_dropped(
    stack: Stack, client: httpx.Client, reference: TaskView, body: dict
) -> None:
    """The worker lives and renews its leases, but its engine server is stopped (SIGSTOP) mid-answer:
    a generation stuck inside one step. Its lease is no longer renewed, another worker goes on."""
    task_id = submit(client, **body)
    before = streaming(client, task_id)
    stuck = holder(stack, before)
    server = next(p for p in psutil.Process(stack.workers[stuck].pid).children()
                  if "llama-server" in " ".join(p.cmdline()) or "vllm" in " ".join(p.cmdline()))
    server.suspend()
    try:
        assert wait_for_attempt(stack, task_id, 2, timeout_s=60) < STALL_S + Settings().lease_s + TAKEOVER_BOUND_S
    finally:
        server.resume()
    final, seen = poll_until_finished(client, task_id, after=before.cursor)
    assert_one_answer(before, seen, final, reference)
    log = stack.logs / f"{stuck}.log"
    assert f"task {task_id}: no token for" in log.read_text()
    entries = redis.Redis.from_url(stack.redis_url).xrange(chunks_key(task_id))
    attempts = [int(fields[b"attempt"]) for _, fields in entries if b"attempt" in fields]
    assert attempts == sorted(attempts), "the stuck worker wrote after the takeover"


@on("llamacpp", "transformers")
def test_a_stopped_worker_hands_its_task_back_at_once(
    stack: Stack, client: httpx.Client, reference: TaskView, body: dict
) -> None:
    """SIGTERM (docker stop, a rolling restart, make run's Ctrl-C) used to wait for the generation to
    end; now the task goes on in the other worker long before its lease could lapse, and the hand
    back does not count against MAX_ATTEMPTS."""
    task_id = submit(client, **body)
    before = streaming(client, task_id)
    name = holder(stack, before)
    process = stack.workers.pop(name)
    process.terminate()
    assert wait_for_attempt(stack, task_id, 2, timeout_s=60) < Settings().lease_s
    process.wait(timeout=10)
    final, seen = poll_until_finished(client, task_id, after=before.cursor)
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")
    assert_one_answer(before, seen, final, reference)
    assert redis.Redis.from_url(stack.redis_url).hget(f"task:{task_id}", "handed_back") == b"1"


@on("llamacpp", "vllm")
def test_a_response_stream_keeps_its_sequence_numbers_across_a_takeover(
    stack: Stack, client: httpx.Client, body: dict
) -> None:
    """The SDK's stream stays open through the worker's death and goes on; a stream resumed from
    any event after the takeover gets the same events as the live one did."""
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
    request = {"model": MODEL, "input": PROMPT, "temperature": 0, "max_output_tokens": body["max_new_tokens"] // 2}
    uninterrupted = sdk.responses.create(**request)
    stream = sdk.responses.create(**request, background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if sum(e.type == "response.output_text.delta" for e in seen) == 2:
            break
    response_id = seen[0].response.id
    stack.stop_worker(holder(stack, poll_until(client, response_id.removeprefix("resp_"), lambda v: True)), kill=True)
    events = seen + list(stream)
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")

    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events))), "a number was skipped, repeated or went back"
    final = sdk.responses.retrieve(response_id)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" and text == final.output_text == uninterrupted.output_text
    middle = numbers[len(seen) + 2]
    resumed = list(sdk.responses.retrieve(response_id, stream=True, starting_after=middle))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events if e.sequence_number > middle]

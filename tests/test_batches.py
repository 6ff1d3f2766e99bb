"""OpenAI's Batch API on the durable queue, driven by the official `openai` package against the real stack."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from app.background import renewed
from core.batches import BatchStore
from devstack.processes import Stack
from tests.extra_api import extra_api

MODEL = "SmolLM2-135M-Instruct"
BATCH_TIMEOUT_S = 300


def chat_line(i: int, max_tokens: int = 6) -> dict:
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"Name the number {i} in words."}]}}


def jsonl(lines: list[dict | str]) -> bytes:
    return ("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n").encode()


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def start(client: openai.OpenAI, lines: list[dict | str], endpoint: str = "/v1/chat/completions") -> str:
    uploaded = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status == "validating" and batch.metadata == {"run": "test"}
    return batch.id


def until(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout_s: float = BATCH_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.2)
    return batch


def entries(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_of_chat_lines_answers_as_the_live_endpoint(sdk: openai.OpenAI) -> None:
    lines = [chat_line(i) for i in range(50)]
    batch = until(sdk, start(sdk, lines), ("completed", "failed"))
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and (batch.request_counts.total, batch.request_counts.completed,
                                                 batch.request_counts.failed) == (50, 50, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    output = entries(sdk, batch.output_file_id)
    assert sorted(entry["custom_id"] for entry in output) == sorted(line["custom_id"] for line in lines)
    for entry in output:
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        line = next(line for line in lines if line["custom_id"] == entry["custom_id"])
        live = sdk.chat.completions.with_raw_response.create(**line["body"]).http_response.json()
        body = entry["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == live["model"]
        assert body["choices"] == live["choices"] and body["usage"] == live["usage"], entry["custom_id"]
    assert batch.id in [b.id for b in sdk.batches.list()]


def test_a_file_with_bad_lines_fails_naming_them(sdk: openai.OpenAI) -> None:
    good = chat_line(0)
    lines: list[dict | str] = [
        good,
        "{not json",
        {**chat_line(1), "custom_id": "line-0"},
        {**chat_line(2), "url": "/v1/completions"},
        {**chat_line(3), "method": "GET"},
        {**chat_line(4), "body": {"model": MODEL, "messages": [], "max_tokens": 4}},
        {**chat_line(5), "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}},
    ]
    batch = until(sdk, start(sdk, lines), ("failed", "completed"))
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None
    named = {error.line: error for error in batch.errors.data or []}
    assert sorted(named) == [2, 3, 4, 5, 6, 7], named
    assert named[3].code == "duplicate_custom_id" and named[4].param == "url" and named[5].param == "method"
    assert named[7].param == "temperature" and "messages" in (named[6].message or "")


def test_cancel_keeps_what_finished_and_cancels_the_rest(sdk: openai.OpenAI) -> None:
    lines = [chat_line(i, max_tokens=48) for i in range(40)]
    batch_id = start(sdk, lines)
    in_progress = until(sdk, batch_id, ("in_progress",))
    assert in_progress.request_counts is not None and in_progress.request_counts.total == 40
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while (sdk.batches.retrieve(batch_id).request_counts.completed or 0) < 2:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelling = sdk.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = until(sdk, batch_id, ("cancelled",))
    assert batch.cancelling_at and batch.cancelled_at
    output, errors = entries(sdk, batch.output_file_id), entries(sdk, batch.error_file_id)
    assert len(output) >= 2 and len(output) + len(errors) == 40
    assert all(entry["response"]["status_code"] == 200 for entry in output)
    assert any(entry["error"]["code"] == "batch_cancelled" for entry in errors)
    assert batch.request_counts is not None and batch.request_counts.completed == len(output)
    with pytest.raises(openai.APIStatusError) as late:
        sdk.batches.cancel(until(sdk, start(sdk, [chat_line(0)]), ("completed",)).id)
    assert late.value.status_code == 409


def test_a_window_that_passes_expires_the_batch_and_keys_see_only_their_own(
    api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    overrides = {"API_KEYS": "a:key-a,b:key-b", "BATCH_WINDOW_S": "4", "BATCH_MAX_IN_FLIGHT": "2"}
    with extra_api(stack_env, tmp_path_factory.mktemp("batches"), overrides) as url:
        a = openai.OpenAI(base_url=f"{url}/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=f"{url}/v1", api_key="key-b", max_retries=0)
        batch_id = start(a, [chat_line(i, max_tokens=64) for i in range(30)])
        with pytest.raises(openai.NotFoundError):
            b.batches.retrieve(batch_id)
        with pytest.raises(openai.NotFoundError):
            b.batches.cancel(batch_id)
        assert b.batches.list().data == []
        batch = until(a, batch_id, ("expired",))
        assert batch.expired_at and batch.expires_at and batch.expired_at >= batch.expires_at
        output, errors = entries(a, batch.output_file_id), entries(a, batch.error_file_id)
        assert len(output) + len(errors) == 30 and len(output) < 30
        assert {entry["error"]["code"] for entry in errors} <= {"batch_expired"}
        with pytest.raises(openai.NotFoundError):
            b.files.content(batch.error_file_id or "")


def test_a_batch_of_responses_and_of_completions(sdk: openai.OpenAI) -> None:
    responses = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                  "body": {"model": MODEL, "input": f"Say {i}.", "max_output_tokens": 16, "temperature": 0}}
                 for i in range(3)]
    batch = until(sdk, start(sdk, responses, "/v1/responses"), ("completed", "failed"))
    assert batch.status == "completed", batch
    for entry in entries(sdk, batch.output_file_id):
        assert entry["response"]["body"]["object"] == "response" and entry["response"]["body"]["status"] in (
            "completed", "incomplete")
    completions = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": MODEL, "prompt": f"{i}, {i + 1},", "max_tokens": 4, "temperature": 0}}
                   for i in range(3)]
    batch = until(sdk, start(sdk, completions, "/v1/completions"), ("completed", "failed"))
    assert batch.status == "completed", batch
    assert [entry["response"]["body"]["object"] for entry in entries(sdk, batch.output_file_id)] == [
        "text_completion"] * 3


def test_unknown_input_files_and_endpoints_are_refused(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    uploaded = sdk.files.create(file=("b.jsonl", jsonl([chat_line(0)])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_nope")




@pytest.fixture(scope="module")
def own_stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own, whose worker and API this module kills."""
    running = Stack(tmp_path_factory.mktemp("batch-restarts"), stack_env)
    running.start_redis()
    running.start_worker("first")
    running.start_worker("second")
    running.start_api()
    running.wait_healthy()
    yield running
    running.down()


def test_a_batch_survives_a_killed_worker_and_a_restarted_api(own_stack: Stack) -> None:
    """Every line answered once, and one output file, though its worker and the API died mid-batch."""
    client = openai.OpenAI(base_url=f"{own_stack.url}/v1", api_key="unused", max_retries=2)
    lines = [chat_line(i, max_tokens=24) for i in range(30)]
    batch_id = start(client, lines)
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while (client.batches.retrieve(batch_id).request_counts.completed or 0) < 3:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    own_stack.stop_worker("first", kill=True)
    assert own_stack.api is not None
    own_stack.api.kill()
    own_stack.api.wait()
    own_stack.start_api()
    own_stack.wait_healthy()
    batch = until(client, batch_id, ("completed", "failed"))
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (30, 0)
    output = entries(client, batch.output_file_id)
    assert sorted(entry["custom_id"] for entry in output) == sorted(line["custom_id"] for line in lines)
    assert all(entry["response"]["status_code"] == 200 for entry in output)
    written = [f for f in client.files.list() if f.filename.startswith(batch_id)]
    assert [f.id for f in written] == [batch.output_file_id]


def test_metrics_count_batches_by_status_and_their_lines(sdk: openai.OpenAI, api_url: str) -> None:
    def samples() -> dict[tuple[str, str], float]:
        families = text_string_to_metric_families(httpx.get(f"{api_url}/metrics", timeout=30).text)
        return {(s.name, s.labels.get("status") or s.labels.get("outcome", "")): s.value
                for f in families for s in f.samples if "batch" in s.name}

    before = samples()
    until(sdk, start(sdk, [chat_line(0), chat_line(1)]), ("completed",))
    after = samples()
    assert after[("queued_llama_batches", "completed")] == before.get(("queued_llama_batches", "completed"), 0) + 1
    lines = ("queued_llama_batch_lines_total", "completed")
    assert after[lines] == before.get(lines, 0) + 2


def test_run_client_runs_a_batch_file_and_writes_its_output_beside_it(api_url: str, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([chat_line(i) for i in range(4)]))
    command = [sys.executable, "run_client.py", "batch", str(requests), "--url", api_url, "--poll-interval", "0.2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BATCH_TIMEOUT_S,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "requests.output.jsonl").read_text().splitlines()]
    assert sorted(entry["custom_id"] for entry in written) == [f"line-{i}" for i in range(4)]
    assert "completed" in done.stderr and not (tmp_path / "requests.errors.jsonl").exists()


@pytest.mark.fast
def test_each_line_is_counted_once_however_many_passes_see_it(private_redis: str) -> None:
    """Two API processes may advance one batch (a lock that lapsed): they note and count the same lines, and
    a line still counts once. A pass reads only the open lines."""
    client = redis.Redis.from_url(private_redis)
    store = BatchStore(client)
    batch = store.create(None, "/v1/chat/completions", "file-x", 60, "24h", {}, None)
    for _ in range(2):
        store.note_tasks(batch, 0, ["a"])
        store.note_tasks(batch, 1, ["b", "c"])
        store.note_tasks(batch, 2, ["!refused"], refused=True)
    assert store.open_lines(batch) == {0: ["a"], 1: ["b", "c"]}
    for _ in range(2):
        store.close_lines(batch, completed=[0], failed=[])
    store.note_tasks(batch, 0, ["a"])  # a late note of a counted line does not open it again
    again = store.get(batch.id)
    assert again is not None and (again.submitted, again.completed, again.failed) == (3, 1, 1)
    assert store.open_lines(batch) == {1: ["b", "c"]}


@pytest.mark.fast
def test_a_pass_keeps_its_batch_lock_however_long_its_step_takes(private_redis: str) -> None:
    """A file of many lines outlasts the lock's timeout: the lock is renewed while the step runs, so no other
    API process takes the batch meanwhile, and it lapses once nobody renews it."""
    client = redis.Redis.from_url(private_redis)
    lock = client.lock("batch:test:lock", timeout=0.6, blocking=False, thread_local=False)
    assert lock.acquire()
    with renewed(lock):
        time.sleep(1.8)  # three timeouts
        assert lock.owned() and not client.lock("batch:test:lock", timeout=1, blocking=False).acquire()
    time.sleep(1.0)
    assert not lock.owned(), "nobody renews it once the step is over: it lapses"

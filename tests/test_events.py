"""Our own API, pushed and forgiving: SSE with resumable cursors, trailing slashes, the tutorial's poller."""

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse

from core.protocol import TaskStatus, TaskView
from devstack.processes import ROOT
from tests.extra_api import extra_api
from tests.helpers import submit

STORY = "Write a short story about a lighthouse keeper."


@dataclass
class Event:
    event: str
    id: str
    data: dict


def read_events(
    client: httpx.Client, task_id: str, headers: dict | None = None, stop_after: int | None = None
) -> list[Event]:
    """Events until the result (or until `stop_after` chunks, when the connection is dropped), read
    with httpx-sse, which parses the stream as the SSE spec says (pings are comments, skipped)."""
    events: list[Event] = []
    with connect_sse(client, "GET", f"/task/{task_id}/events", headers=headers or {}, timeout=180) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            events.append(Event(sse.event, sse.id, sse.json()))
            chunks = sum(e.event == "chunk" for e in events)
            if sse.event in ("result", "error") or (stop_after is not None and chunks >= stop_after):
                break
    return events


def test_events_push_every_chunk_with_its_cursor_then_the_result(client: httpx.Client) -> None:
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
    events = read_events(client, task_id)
    chunks, result = [e for e in events if e.event == "chunk"], events[-1]  # a `queued` event may come first
    assert result.event == "result" and len(chunks) > 1
    final = TaskView.model_validate(result.data)
    assert final.status == TaskStatus.succeeded and final.message is None
    assert "".join(e.data["text"] for e in chunks) == final.text
    polled = client.get(f"/task/{task_id}").json()
    assert [e.id for e in chunks] == [c["cursor"] for c in polled["chunks"]], "event ids are the poll cursors"


def test_a_dropped_stream_resumes_after_its_last_event_id(client: httpx.Client) -> None:
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=48)
    first = read_events(client, task_id, stop_after=2)
    rest = read_events(client, task_id, headers={"Last-Event-ID": first[-1].id})
    final = TaskView.model_validate(rest[-1].data)
    texts = [e.data["text"] for e in first + rest[:-1] if e.event == "chunk"]
    assert "".join(texts) == final.text, "a chunk was lost or repeated"
    started = time.monotonic()
    again = read_events(client, task_id, headers={"Last-Event-ID": rest[-1].id})
    assert [e.event for e in again] == ["result"] and time.monotonic() - started < 5, "a finished task answers at once"


def test_events_refuse_unknown_tasks_and_bad_cursors(client: httpx.Client) -> None:
    assert client.get(f"/task/{uuid.uuid4()}/events").status_code == 404
    task_id = submit(client, prompt="Hi", max_new_tokens=1)
    response = client.get(f"/task/{task_id}/events", headers={"Last-Event-ID": "not-a-cursor"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["header", "last-event-id"]


def test_every_route_answers_with_a_trailing_slash_and_no_redirect(client: httpx.Client) -> None:
    accepted = client.post("/generate/", json={"prompt": "Hi", "max_new_tokens": 1})
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    for method, path in (("GET", f"/task/{task_id}/"), ("GET", "/health/"), ("GET", f"/task/{task_id}/events/"),
                         ("GET", "/v1/models/"), ("GET", "/props/")):
        with client.stream(method, path) as response:
            assert response.status_code == 200, (path, response.status_code)
    assert client.delete(f"/task/{task_id}/").status_code in (202, 409)
    response = client.post("/v1/responses/", json={"model": "SmolLM2-135M-Instruct", "input": "Hi",
                                                   "max_output_tokens": 1, "background": True})
    assert response.status_code == 200, response.text
    assert client.get(f"/v1/responses/{response.json()['id']}/").status_code == 200


def tutorial_poller(base_url: str, prompt: str) -> str:
    """The tutorial's client, as it was written: http.client, POST /generate/, then GET /task/{id}
    every 2 s until the body no longer says "Task not completed yet"; it prints that body."""
    url = urlparse(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/generate/", json.dumps({"prompt": prompt}), {"Content-Type": "application/json"})
    task_id = json.loads(connection.getresponse().read())["task_id"]
    while True:
        connection.request("GET", f"/task/{task_id}")
        body = connection.getresponse().read().decode()
        if "Task not completed yet" not in body:
            return body
        time.sleep(2)


def test_the_tutorials_poller_prints_the_answer_with_time_and_memory(api_url: str) -> None:
    body = json.loads(tutorial_poller(api_url, "What is the capital of France?"))
    assert body["status"] == "succeeded" and body["text"]
    assert body["timings"]["total_s"] > 0 and body["memory"]["peak_bytes"] > 0


def run_client(url: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run_client.py", "--url", url, "--max-tokens", "24", "--temperature", "0", *args]
    return subprocess.run(command + [STORY], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_the_client_follows_the_event_stream_and_polls_on_request(api_url: str) -> None:
    pushed, polled = run_client(api_url), run_client(api_url, "--poll")
    assert pushed.returncode == 0 and polled.returncode == 0, pushed.stderr + polled.stderr
    assert pushed.stdout.strip() and pushed.stdout == polled.stdout
    assert "tok/s" in pushed.stderr


def test_a_stream_waits_as_long_as_its_task_does(
    redis_server: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A stream idle for longer than redis-py's default 5 s socket timeout (a task waiting in a
    queue) used to break with a 'Redis unreachable'; it waits, and ends with the task."""
    overrides = {"REDIS_URL": redis_server.rsplit("/", 1)[0] + "/4"}  # no worker consumes here
    with extra_api(stack_env, tmp_path_factory.mktemp("idle_stream"), overrides) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            task_id = submit(client, prompt="Hi", max_new_tokens=1)
            threading.Timer(8, lambda: httpx.delete(f"{url}/task/{task_id}", timeout=10)).start()
            events = read_events(client, task_id)
    assert [e.event for e in events] == ["queued", "result"] and events[-1].data["status"] == "cancelled"
    assert events[0].data == {"queue_position": 0, "estimated_start_s": None}  # no worker here: no estimate


def test_many_streams_at_once_are_all_served(
    redis_server: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each open stream holds a connection to Redis: redis-py's default pool of 100 answered the
    101st with a 503. 150 streams wait on queued tasks, then each ends with its task's cancel."""
    overrides = {"REDIS_URL": redis_server.rsplit("/", 1)[0] + "/5", "MAX_QUEUED_TASKS": "1000",
                 "MAX_STREAMS_PER_KEY": str(STREAMS)}
    with extra_api(stack_env, tmp_path_factory.mktemp("many_streams"), overrides) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            task_ids = [submit(client, prompt="Hi", max_new_tokens=1) for _ in range(STREAMS)]
        statuses = asyncio.run(follow_all(url, task_ids))
    assert statuses == ["cancelled"] * STREAMS


STREAMS = 150


async def follow_all(url: str, task_ids: list[str]) -> list[str]:
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        opened = asyncio.Semaphore(0)

        async def one(task_id: str) -> str:
            async with aconnect_sse(client, "GET", f"/task/{task_id}/events") as source:
                assert source.response.status_code == 200, await source.response.aread()
                opened.release()
                async for event in source.aiter_sse():
                    if event.event == "result":
                        return event.json()["status"]
            return "no result"

        followers = [asyncio.create_task(one(task_id)) for task_id in task_ids]
        for _ in task_ids:
            await asyncio.wait_for(opened.acquire(), 60)
        for task_id in task_ids:
            assert (await client.delete(f"/task/{task_id}")).status_code == 202
        return await asyncio.gather(*followers)

"""Partition: a worker on a network address of its own, cut off from Redis mid-answer.

The worker runs in a network namespace of the test's own whose one way out is a veth pair to the
host, where redis-server listens on the host-side address beside 127.0.0.1. Taking that link down
drops the worker's packets without closing anything (no reset, no error: a host gone from the
network), unlike a killed or frozen process. Answers are greedy (temperature 0), so the answer
taken over must end exactly as the same request's uninterrupted answer, which is asked for first.
Default lease settings: the bound checked is the one a user gets.
"""

import ipaddress
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from core.protocol import TaskStatus
from core.store import chunks_key
from devstack.processes import (
    api_command,
    free_port,
    spawn,
    stop,
    stop_all,
    wait_healthy,
    wait_until,
    worker_command,
)
from devstack.redis_server import answers, redis_binary
from tests.helpers import poll_until, poll_until_finished, submit

TAKEOVER_BOUND_S = 15  # from the cut to a chunk of the next attempt, as for a worker that died
# Other runs may share the CPU, and a model sharing two cores with another slows down many times over.
SLOW_S = 600
BODY = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 128}
INSIDE = "inside"  # the worker in the namespace
OUTSIDE = "outside"  # the worker on the host


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Link:
    """A network namespace whose only links are its loopback and one veth pair to the host."""

    namespace: str
    host_side: str
    host_address: str
    inner_address: str

    def down(self) -> None:
        ip("link", "set", self.host_side, "down")

    def up(self) -> None:
        ip("link", "set", self.host_side, "up")


def unused_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.213.0.0/16 that no address on this host is in (each run picks another)."""
    taken = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True).stdout
    while True:
        subnet = ipaddress.IPv4Network(f"10.213.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        if not any(str(host) in taken for host in subnet):
            return subnet


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    tag = uuid.uuid4().hex[:8]
    namespace, host_side, inner_side = f"partition-{tag}", f"vh{tag}", f"vn{tag}"
    host_address, inner_address = (str(a) for a in unused_subnet().hosts())
    try:
        ip("netns", "add", namespace)
        ip("link", "add", host_side, "type", "veth", "peer", "name", inner_side)
        ip("link", "set", inner_side, "netns", namespace)
        ip("addr", "add", f"{host_address}/30", "dev", host_side)
        ip("link", "set", host_side, "up")
        inside = ["-n", namespace]
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "addr", "add", f"{inner_address}/30", "dev", inner_side)
        ip(*inside, "link", "set", inner_side, "up")
        yield Link(namespace, host_side, host_address, inner_address)
    finally:
        subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=30)  # both ends go
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


@dataclass
class Stack:
    logs: Path
    url: str
    redis_url: str  # as the host sees Redis
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    api: subprocess.Popen | None = None
    redis: subprocess.Popen | None = None

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(link: Link, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis on 127.0.0.1 and the link's host side, the API and one worker on the host, and one
    worker inside the namespace that reaches Redis only through the link."""
    logs = tmp_path_factory.mktemp("partition")
    port = free_port()
    env = stack_env | {
        "REDIS_URL": f"redis://127.0.0.1:{port}/0", "API_PORT": str(free_port()), "QUANTIZATION": "none",
    }
    running = Stack(logs, f"http://127.0.0.1:{env['API_PORT']}", env["REDIS_URL"])
    try:
        running.redis = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", link.host_address, "--dir", str(logs),
             "--appendonly", "yes", "--save", ""],
            stdout=open(logs / "redis.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        for url in (env["REDIS_URL"], f"redis://{link.host_address}:{port}/0"):
            wait_until(lambda: answers(url, timeout_s=0.5), 10, f"redis-server at {url}")
        # WORKER_REDIS_RETRY_S stays at its 30 s: the cut lasts about a lease, so the worker's write
        # is still retrying when the link comes back, and meets the fence.
        inside_env = env | {"REDIS_URL": f"redis://{link.host_address}:{port}/0"}
        running.workers[INSIDE] = spawn(
            INSIDE, ["ip", "netns", "exec", link.namespace, *worker_command(INSIDE)], inside_env, logs
        )
        running.workers[OUTSIDE] = spawn(OUTSIDE, worker_command(OUTSIDE), env, logs)
        running.api = spawn("api", api_command("127.0.0.1", env["API_PORT"]), env, logs)
        wait_healthy(running.url, {"api": running.api, **running.workers}, logs)
        with httpx.Client(base_url=running.url, timeout=30) as c:
            wait_until(lambda: "2 ready" in workers_detail(c), 300, "both workers")
        yield running
    finally:
        link.up()  # a worker left cut off would wait out its Redis retries before it stops
        stop_all([p for p in [running.api, *running.workers.values()] if p is not None], timeout_s=30)
        if running.redis is not None:
            stop(running.redis)


def workers_detail(client: httpx.Client) -> str:
    return client.get("/health").json()["workers"]["detail"]


def held_by(client: httpx.Client, task_id: str) -> str:
    """The name of the worker running the task (Celery's is `<name>@<host>`)."""
    view = poll_until(client, task_id, lambda v: v.status == TaskStatus.running and bool(v.worker), timeout_s=60)
    return (view.worker or "").split("@")[0]


def started_inside(client: httpx.Client) -> str:
    """A task with BODY that the namespaced worker runs: the first one if it took it, else a
    second one, which it must take while the host worker is busy; the first is then cancelled,
    so that the host worker is free to take over."""
    first = submit(client, **BODY)
    if held_by(client, first) == INSIDE:
        return first
    second = submit(client, **BODY)
    assert held_by(client, second) == INSIDE
    assert client.delete(f"/task/{first}").status_code in (202, 409)  # 409: it had just finished
    poll_until(client, first, lambda v: v.status.finished, timeout_s=SLOW_S)
    return second


def attempts_written(redis_url: str, task_id: str) -> list[int]:
    entries = redis.Redis.from_url(redis_url).xrange(chunks_key(task_id))
    return [int(fields[b"attempt"]) for _, fields in entries if b"attempt" in fields]


def test_a_worker_cut_off_from_redis_is_taken_over_fenced_off_and_rejoins(stack: Stack, link: Link) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        reference, _ = poll_until_finished(client, submit(client, **BODY), timeout_s=SLOW_S)
        assert reference.status == TaskStatus.succeeded and reference.attempt == 1

        task_id = started_inside(client)
        before = poll_until(client, task_id, lambda v: len(v.chunks) >= 3)
        link.down()
        cut_at = time.monotonic()
        try:
            # Its heartbeat stops reaching Redis: /health no longer counts it.
            wait_until(lambda: f"{INSIDE}@" not in workers_detail(client), 30, "the cut-off worker to go stale")
            wait_until(lambda: 2 in attempts_written(stack.redis_url, task_id), 60, "attempt 2 to write")
            taken_over_s = time.monotonic() - cut_at
        finally:
            link.up()
        assert taken_over_s < TAKEOVER_BOUND_S, f"taken over {taken_over_s:.1f} s after the cut"

        # The reader that kept its cursor saw every chunk once, and the answer is the uninterrupted one.
        final, seen = poll_until_finished(client, task_id, after=before.cursor, timeout_s=SLOW_S)
        assert final.status == TaskStatus.succeeded and final.attempt == 2, final
        assert final.worker and final.worker.startswith(f"{OUTSIDE}@")
        assert "".join(c.text for v in [before, *seen] for c in v.chunks) == final.text, "a chunk repeated or lost"
        assert final.text == reference.text, "the answer did not go on where it stopped"
        assert final.usage == reference.usage and final.finish_reason == reference.finish_reason

        # Back on the network, the cut-off worker learns it was superseded, and nothing it wrote late landed.
        superseded = f"task {task_id}: another"  # its lease thread or its generation, whichever notices first
        wait_until(lambda: superseded in stack.log(INSIDE), 60, "the cut-off worker to learn it was superseded")
        attempts = attempts_written(stack.redis_url, task_id)
        assert attempts == sorted(attempts) and attempts[-1] == 2, "the cut-off worker wrote after the takeover"
        assert client.get(f"/task/{task_id}").json()["text"] == reference.text

        # It rejoins: its heartbeat is fresh again, and it serves the next task once the host worker stops.
        wait_until(lambda: "2 ready" in workers_detail(client), 60, "the cut-off worker's heartbeat")
        assert f"{INSIDE}@" in workers_detail(client)
        stop(stack.workers.pop(OUTSIDE), timeout_s=60)
        after, _ = poll_until_finished(
            client, submit(client, prompt="What is the capital of France?", temperature=0, max_new_tokens=8),
            timeout_s=SLOW_S,
        )
        assert after.status == TaskStatus.succeeded and after.attempt == 1, after
        assert after.worker and after.worker.startswith(f"{INSIDE}@")

"""Redis Sentinel: the service follows a failover by itself, and REDIS_MIN_REPLICAS holds back the 202.

Real processes only: a primary, a replica and three Sentinels (all redis-server, the Sentinels
started with --sentinel from a config file in the test's folder, with a 1 s down-after), a worker
and two APIs. Every one of them finds the primary through the Sentinels: their REDIS_URL names a
port where nothing listens, so only its database number counts. The first API waits for no
replica (REDIS_MIN_REPLICAS=0); the second waits for one.
"""

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from core.protocol import TaskStatus, TaskView
from core.redis_client import REPLICA_WAIT_MS, connect
from core.settings import Settings
from core.store import chunks_key, record_key
from devstack.processes import api_command, free_port, spawn, stop, wait_healthy, wait_until, worker_command
from devstack.redis_server import answers, redis_binary
from tests.helpers import poll_until_finished, submit

MASTER = "mymaster"
SENTINEL_PASSWORD = "sentinel-secret"  # the Sentinels ask for one (compose: REDIS_PASSWORD)
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000  # a Sentinel whose vote failed tries again after twice this
# From the primary's SIGKILL to POST /generate answering 202 again: down-after (1 s), the Sentinels'
# vote, the promotion. Measured 1.4 to 2.5 s, median 1.6 s, over 25 runs (README, "Redis failover:
# Sentinel"); the bound leaves room for a vote held again after twice FAILOVER_TIMEOUT_MS.
FAILOVER_BOUND_S = 10
STORY = "Write a short story about a lighthouse keeper."
FOLLOWED_TOKENS = 24
DEADLINE_S = 180


@dataclass
class Ha:
    """The Redis side: each node's port and process, and the Sentinels'."""

    folder: Path
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    sentinels: list[subprocess.Popen] = field(default_factory=list)

    @property
    def sentinels_setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start_node(self, port: int, *extra: str) -> None:
        """A redis-server on `port` with its own folder (append-only, as `make run` starts Redis)."""
        data = self.folder / f"redis-{port}"
        data.mkdir(exist_ok=True)
        args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--appendonly", "yes", "--save", "", *extra]
        self.nodes[port] = subprocess.Popen(args, stdout=open(data / "redis.log", "ab"), stderr=subprocess.STDOUT)
        wait_until(lambda: answers(f"redis://127.0.0.1:{port}/0"), 10, f"redis-server on {port}")

    def start_replica(self, of: int) -> None:
        self.start_node(self.replica_port, "--replicaof", "127.0.0.1", str(of))

    def start_sentinel(self, port: int) -> None:
        config = self.folder / f"sentinel-{port}.conf"  # Sentinel rewrites it: it must be writable
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.folder}\nrequirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
        )
        log = open(self.folder / f"sentinel-{port}.log", "ab")
        self.sentinels.append(subprocess.Popen([redis_binary(), str(config), "--sentinel"], stdout=log,
                                               stderr=subprocess.STDOUT))

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2, password=SENTINEL_PASSWORD)

    def named_primary(self) -> set[int]:
        """The primary's port as each Sentinel names it."""
        return {int(self.sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1]) for port in self.sentinel_ports}

    def replicated(self, primary: int, replica: int) -> bool:
        """The replica is linked to `primary`, and every Sentinel knows the other two and sees the replica up."""
        try:
            info = redis.Redis(port=replica, socket_timeout=2).info("replication")
            if info.get("master_link_status") != "up" or int(info["master_port"]) != primary:
                return False
            for port in self.sentinel_ports:
                state = self.sentinel(port).sentinel_master(MASTER)
                replicas = self.sentinel(port).sentinel_slaves(MASTER)
                if state["num-other-sentinels"] < 2 or int(state["port"]) != primary:
                    return False
                if not any(r["port"] == replica and not r["is_sdown"] for r in replicas):
                    return False
            return True
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ha]:
    running = Ha(tmp_path_factory.mktemp("sentinel"), free_port(), free_port(), [free_port() for _ in range(3)])
    try:
        running.start_node(running.primary_port)
        running.start_replica(of=running.primary_port)
        for port in running.sentinel_ports:
            running.start_sentinel(port)
        yield running
    finally:
        running.stop()


@dataclass
class Apis:
    url: str  # REDIS_MIN_REPLICAS=0
    replicas_url: str  # REDIS_MIN_REPLICAS=1


@pytest.fixture(scope="module")
def apis(ha: Ha, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    """A worker and the two APIs, started together (the worker's model load is the long part)."""
    logs = tmp_path_factory.mktemp("sentinel-logs")
    env = stack_env | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there: the Sentinels name the primary
        "REDIS_SENTINELS": ha.sentinels_setting,
        "REDIS_SENTINEL_MASTER": MASTER,
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "QUANTIZATION": "none",
    }
    ports = free_port(), free_port()
    worker = spawn("worker", worker_command("worker"), env, logs)
    api = spawn("api", api_command("127.0.0.1", ports[0]), env | {"API_PORT": str(ports[0])}, logs)
    replicas_env = env | {"API_PORT": str(ports[1]), "REDIS_MIN_REPLICAS": "1"}
    replicas_api = spawn("api-replicas", api_command("127.0.0.1", ports[1]), replicas_env, logs)
    urls = Apis(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
    try:
        wait_healthy(urls.url, {"worker": worker, "api": api}, logs)
        wait_healthy(urls.replicas_url, {"api-replicas": replicas_api}, logs)
        yield urls
    finally:
        for process in (api, replicas_api, worker):
            stop(process)


@pytest.fixture(scope="module")
def admin(ha: Ha) -> redis.Redis:
    """A client of our own `connect`, through the Sentinels, as the services have."""
    return connect(Settings(redis_url="redis://127.0.0.1:1/0", redis_sentinels=ha.sentinels_setting,
                            redis_sentinel_master=MASTER, redis_sentinel_password=SENTINEL_PASSWORD))


def statuses(admin: redis.Redis) -> dict[str, bytes | None]:
    """Every task's status, by id."""
    keys = [key.decode() for key in admin.scan_iter(record_key("*")) if not key.endswith(b":chunks")]
    return {key.removeprefix(record_key("")): admin.hget(key, "status") for key in keys}


def ends(admin: redis.Redis, task_id: str) -> int:
    """How many `end` entries the task's stream holds: one per result written."""
    return sum(b"end" in fields for _, fields in admin.xrange(chunks_key(task_id)))


def test_with_min_replicas_the_api_answers_202_only_once_a_replica_holds_the_task(
    ha: Ha, apis: Apis, admin: redis.Redis
) -> None:
    wait_until(lambda: ha.replicated(ha.primary_port, ha.replica_port), 30, "the replica and the Sentinels")
    replica = redis.Redis(port=ha.replica_port)
    with httpx.Client(base_url=apis.replicas_url, timeout=30) as client:
        task_id = submit(client, prompt="Hi", temperature=0, max_new_tokens=4)
        assert replica.exists(record_key(task_id)), "202 before the replica held the task's record"

        stopped = ha.nodes.pop(ha.replica_port)
        stopped.terminate()
        stopped.wait(timeout=30)
        started = time.monotonic()
        refused = client.post("/generate", json={"prompt": STORY, "temperature": 0, "max_new_tokens": 256})
        took_s = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert "replica" in refused.json()["detail"] and refused.headers["Retry-After"]
        assert took_s < REPLICA_WAIT_MS / 1000 + 2, f"the 503 took {took_s:.1f} s"
        # The refused task was recorded and queued before the wait (the worker may have started it
        # meanwhile): it is cancelled rather than left to run.
        (refused_id,) = set(statuses(admin)) - {task_id}
        wait_until(lambda: statuses(admin)[refused_id] == b"cancelled", DEADLINE_S, "the refused task to be cancelled")

        ha.start_replica(of=ha.primary_port)
        wait_until(lambda: ha.replicated(ha.primary_port, ha.replica_port), 30, "the replica to be back")
        again = submit(client, prompt="Hi", temperature=0, max_new_tokens=4)
        for accepted in (task_id, again):
            final, _ = poll_until_finished(client, accepted)
            assert final.status == TaskStatus.succeeded and final.text


DROP_AFTER = 2  # chunks a reader sees before the primary is killed


@dataclass
class Follower:
    """Reads one task's event stream on its own thread, reconnecting with Last-Event-ID whenever the
    stream breaks or is refused, as a browser's EventSource does. With `rejoin`, it leaves the stream
    after DROP_AFTER chunks and comes back once `rejoin` is set (the primary has just been killed)."""

    url: str
    task_id: str
    rejoin: threading.Event | None = None
    chunks: list[tuple[str, str]] = field(default_factory=list)  # (event id, text)
    result: TaskView | None = None
    reconnects: int = 0
    refused: int = 0  # answers other than 200 to a reconnection (503 while the API has no primary)
    error: BaseException | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # handed to the test, which raises it
            self.error = exc

    def _follow(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while time.monotonic() < deadline:
                headers = {"Last-Event-ID": self.chunks[-1][0]} if self.chunks else {}
                try:
                    with connect_sse(client, "GET", f"/task/{self.task_id}/events", headers=headers) as source:
                        if source.response.status_code != 200:
                            self.refused += 1
                            time.sleep(0.1)
                            continue
                        for sse in source.iter_sse():
                            if sse.event == "chunk":
                                self.chunks.append((sse.id, sse.json()["text"]))
                                if self.rejoin is not None and len(self.chunks) == DROP_AFTER:
                                    break
                            elif sse.event == "result":
                                self.result = TaskView.model_validate(sse.json())
                                return
                            elif sse.event != "queued":
                                raise AssertionError(f"unexpected {sse.event} event: {sse.data}")
                except httpx.HTTPError:
                    pass
                if self.rejoin is not None and len(self.chunks) >= DROP_AFTER:
                    assert self.rejoin.wait(DEADLINE_S)
                    self.rejoin = None
                self.reconnects += 1
        raise TimeoutError(f"the stream of {self.task_id} did not end in {DEADLINE_S} s")

    def check(self, final: TaskView) -> None:
        """Every chunk once, in order, making up the final text; then the result."""
        ids = [event_id for event_id, _ in self.chunks]
        assert len(set(ids)) == len(ids), "a chunk came twice"
        assert "".join(text for _, text in self.chunks) == final.text, "a chunk was lost or repeated"
        assert self.result is not None and self.result.status == TaskStatus.succeeded
        assert self.result.text == final.text


def test_a_killed_primary_is_replaced_and_no_accepted_task_or_chunk_is_lost(
    ha: Ha, apis: Apis, admin: redis.Redis
) -> None:
    wait_until(lambda: ha.replicated(ha.primary_port, ha.replica_port), 30, "the replica and the Sentinels")
    with httpx.Client(base_url=apis.url, timeout=30) as client:
        followed = submit(client, prompt=STORY, temperature=0, max_new_tokens=FOLLOWED_TOKENS)
        queued = [submit(client, prompt="What is the capital of France?", temperature=0, max_new_tokens=8)
                  for _ in range(2)]
        # One reader keeps its connection through the failover; the other comes back during it.
        killed = threading.Event()
        staying, returning = Follower(apis.url, followed), Follower(apis.url, followed, rejoin=killed)
        threads = [staying.start(), returning.start()]
        wait_until(lambda: all(len(f.chunks) >= DROP_AFTER or f.error for f in (staying, returning)), DEADLINE_S,
                   "the answer to stream")
        views = [TaskView.model_validate(client.get(f"/task/{t}").json()) for t in [followed, *queued]]
        assert [v.status for v in views] == [TaskStatus.running, TaskStatus.queued, TaskStatus.queued]

        ha.nodes[ha.primary_port].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        killed.set()
        streamed_before = len(staying.chunks)
        accepted, answers_seen = [], set()
        while not accepted:
            response = client.post("/generate", json={"prompt": "Hi", "temperature": 0, "max_new_tokens": 4})
            answers_seen.add(response.status_code)
            assert response.status_code in (202, 503), response.text  # never a 500 or a hang
            if response.status_code == 202:
                accepted.append(response.json()["task_id"])
            elif time.monotonic() - killed_at > DEADLINE_S:
                raise TimeoutError("the API never answered 202 again")
            else:
                time.sleep(0.05)
        bound_s = time.monotonic() - killed_at
        print(f"\nfailover: POST /generate answered 202 again {bound_s:.2f} s after the primary's SIGKILL")
        assert 503 in answers_seen, "the API never noticed the primary was gone"
        assert bound_s < FAILOVER_BOUND_S, f"202 again only after {bound_s:.1f} s"
        # The Sentinels that did not lead the failover hear of it within a few seconds.
        wait_until(lambda: ha.named_primary() == {ha.replica_port}, 30, "every Sentinel to name the promoted replica")

        for thread in threads:
            thread.join(timeout=DEADLINE_S)
        for follower in (staying, returning):
            if follower.error is not None:
                raise follower.error
        assert len(staying.chunks) > streamed_before, "the answer ended before the failover"
        assert returning.refused >= 1, "the reader came back only after the failover"
        print(f"{streamed_before} chunks before the kill, {len(staying.chunks) - streamed_before} after; the "
              f"returning reader was refused {returning.refused} times")

        for task_id in [followed, *queued, *accepted]:
            final, _ = poll_until_finished(client, task_id)
            assert final.status == TaskStatus.succeeded and final.text, (task_id, final)
            assert ends(admin, task_id) == 1, f"{task_id} has {ends(admin, task_id)} results"
        final = TaskView.model_validate(client.get(f"/task/{followed}").json())
        staying.check(final)
        returning.check(final)

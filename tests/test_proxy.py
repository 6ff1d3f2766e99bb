"""Two API replicas behind a real nginx running deploy/nginx.conf itself: the shipped file with its one
upstream line and its listen addresses swapped for the test's (and temp paths in the test's folder).

Through nginx: event stream chunks arrive as they are generated, not in one lump; a stream whose
replica is killed resumes on the other with Last-Event-ID, no chunk lost or repeated; the API's own
413, 429 and 401 (JSON bodies, Retry-After, WWW-Authenticate) reach the client unchanged; the
status_url names the proxy's address; no replica at all is a 502 in JSON. One redis-server and one
worker serve the open pair; a keyed pair with a small queue limit, on a Redis database no worker
consumes, shares the redis-server.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from app.body_limit import DRAIN_BYTES
from core.protocol import TaskStatus, TaskView
from core.settings import Settings
from devstack.processes import (
    ROOT,
    Stack,
    api_command,
    free_port,
    spawn,
    stop,
    stop_all,
    wait_healthy,
    wait_until,
)
from tests.helpers import submit

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
STARTUP_S = 120
STREAM_TIMEOUT_S = 180
STORY = "Write a short story about a lighthouse keeper."
KEY = "proxy-test-key"
DEFAULTS = Settings(_env_file=None)


def nginx_binary() -> str:
    """Debian's nginx (`make test` installs it); /usr/sbin may not be on a user's PATH."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    assert found, "nginx is not installed: `make test` installs it (apt-get install nginx)"
    return found


def replace_one(text: str, pattern: str, replacement: str) -> str:
    """Exactly one match, so that a change to the shipped file fails here rather than go untested."""
    result, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{count} matches of {pattern!r} in {NGINX_CONF}"
    return result


def render(upstreams: list[str], port: int, health_port: int, run_dir: Path) -> str:
    """deploy/nginx.conf with the test's replicas and ports; every other directive as shipped."""
    text = NGINX_CONF.read_text()
    servers = " ".join(f"server {address};" for address in upstreams)
    text = replace_one(text, r"^\s*server api:8000 resolve;.*$", f"        {servers}")
    text = replace_one(text, r"listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;")
    text = replace_one(text, r"listen 127\.0\.0\.1:8081;", f"listen 127.0.0.1:{health_port};")
    temp_paths = "".join(
        f"    {kind}_temp_path {run_dir / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return replace_one(text, r"^http \{\n", "http {\n" + temp_paths)


@dataclass
class Proxy:
    url: str
    log: Path  # nginx's error log and access log (`access_log /dev/stdout`)


@contextmanager
def nginx_in_front_of(upstreams: list[str], run_dir: Path) -> Iterator[Proxy]:
    """nginx as a child process (not a daemon), its pid file, temp files and log in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port, health_port = free_port(), free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(render(upstreams, port, health_port, run_dir))
    # As root, nginx's workers would run as `nobody`, which cannot enter the test's folders.
    main = f"daemon off; pid {run_dir / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
    command = [nginx_binary(), "-e", "stderr", "-p", str(run_dir), "-c", str(conf), "-g", main]
    process = spawn("nginx", command, dict(os.environ), run_dir)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(run_dir / 'nginx.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 30, f"nginx on port {port}")
        yield Proxy(f"http://127.0.0.1:{port}", run_dir / "nginx.log")
    finally:
        stop(process, timeout_s=10)


@dataclass
class Replicas:
    """API processes on ports of their own, with one environment; each can be killed and started again."""

    env: dict[str, str]
    logs: Path
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self, port: int | None = None) -> None:
        port = port or free_port()
        env = self.env | {"API_PORT": str(port)}
        self.processes[port] = spawn(f"api-{port}", api_command("127.0.0.1", port), env, self.logs)

    def wait_answering(self) -> None:
        """Any HTTP answer from /health: the keyed pair has no worker, so it says 503."""
        for port, process in self.processes.items():

            def answers(port: int = port, process: subprocess.Popen = process) -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"api-{port} exited: {(self.logs / f'api-{port}.log').read_text()[-3000:]}")
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
                except httpx.HTTPError:
                    return False
                return True

            wait_until(answers, STARTUP_S, f"the API on port {port}", interval_s=0.2)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.processes]

    def url(self, index: int) -> str:
        return f"http://{self.addresses[index]}"

    def kill(self, port: int) -> None:
        process = self.processes[port]
        process.kill()
        process.wait()

    def stop(self) -> None:
        stop_all(list(self.processes.values()), timeout_s=10)


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A redis-server and one worker of the module's own."""
    stack = Stack(tmp_path_factory.mktemp("proxy_stack"), stack_env)
    stack.start_redis()
    stack.start_worker()
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def replicas(stack: Stack) -> Iterator[Replicas]:
    """Two open API processes on the stack's Redis, healthy (the worker answered)."""
    replicas = Replicas(stack.env, stack.logs)
    replicas.start()
    replicas.start()
    try:
        replicas.wait_answering()
        wait_healthy(replicas.url(0), {"worker": stack.workers["worker"]}, stack.logs)
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def proxy(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with nginx_in_front_of(replicas.addresses, tmp_path_factory.mktemp("nginx")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def keyed_replicas(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two API processes with API_KEYS and a queue limit of 2, on a Redis database no worker consumes."""
    env = stack.env | {"REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + "/1", "MAX_QUEUED_TASKS": "2", "API_KEYS": KEY}
    replicas = Replicas(env, tmp_path_factory.mktemp("keyed"))
    replicas.start()
    replicas.start()
    try:
        replicas.wait_answering()
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def keyed_proxy(keyed_replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with nginx_in_front_of(keyed_replicas.addresses, tmp_path_factory.mktemp("keyed_nginx")) as proxy:
        yield proxy


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client


@dataclass
class Arrival:
    at: float
    sse: ServerSentEvent


def test_stream_chunks_arrive_as_they_are_generated(client: httpx.Client) -> None:
    """A buffering proxy would hold the small events back and hand them over in one lump at the end."""
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=64)
    arrivals: list[Arrival] = []
    with connect_sse(client, "GET", f"/task/{task_id}/events", timeout=STREAM_TIMEOUT_S) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            arrivals.append(Arrival(time.monotonic(), sse))
            if sse.event == "result":
                break
    chunks = [a for a in arrivals if a.sse.event == "chunk"]
    result = arrivals[-1]
    final = TaskView.model_validate(result.sse.json())
    assert result.sse.event == "result" and final.status == TaskStatus.succeeded
    assert "".join(c.sse.json()["text"] for c in chunks) == final.text
    assert final.timings is not None
    generation_s = final.timings.generation_s
    assert len(chunks) >= 4, f"{len(chunks)} chunks"
    # The first chunk comes early in the generation, not with the result...
    assert result.at - chunks[0].at >= 0.5 * generation_s, (
        f"first chunk {result.at - chunks[0].at:.2f} s before the result; the generation took {generation_s:.2f} s"
    )
    # ...and the others one after another, at several distinct times.
    assert len({round(c.at, 2) for c in chunks}) >= 4, [round(c.at - chunks[0].at, 3) for c in chunks]


def test_status_url_names_the_proxy(client: httpx.Client, proxy: Proxy, replicas: Replicas) -> None:
    """The Host the client used, with its port, and nginx's scheme; what a client says in
    X-Forwarded-* does not count (nginx sets them), and the URL answers through the proxy."""
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    for headers in ({}, forged):
        accepted = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1}, headers=headers)
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        assert body["status_url"] == f"{proxy.url}/task/{body['task_id']}"
        assert client.get(body["status_url"]).status_code == 200
    # Asked directly, a replica names itself: the proxy's address above came from the proxy.
    direct = httpx.post(f"{replicas.url(0)}/generate", json={"prompt": "Hi", "max_new_tokens": 1}, timeout=30)
    assert direct.json()["status_url"].startswith(f"{replicas.url(0)}/task/")


def oversized(size: int) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(size // 65_536 + 1):
        yield b"a" * 65_536
    yield b'"}'


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("size", "chunked"),
    [(DEFAULTS.max_request_bytes, False), (DEFAULTS.max_request_bytes, True), (8 * DEFAULTS.max_request_bytes, False)],
    ids=["just-over", "chunked", "8x-over"],
)
def test_413_is_the_apis_own(proxy: Proxy, replicas: Replicas, path: str, size: int, chunked: bool) -> None:
    """Each family's JSON envelope, as a replica answers it directly, never nginx's HTML page."""
    answers = []
    for url in (proxy.url, replicas.url(0)):
        body = oversized(size) if chunked else b"".join(oversized(size))
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert ("content-length" not in response.request.headers) == chunked
        answers.append((response.status_code, response.headers["content-type"], response.json()))
    through, direct = answers
    assert through == direct and through[0] == 413
    assert str(DEFAULTS.max_request_bytes) in json.dumps(through[2])


def test_a_client_that_sends_its_whole_body_first_gets_the_apis_413(proxy: Proxy) -> None:
    """urllib writes all of the body before it reads: nginx streams it on, the API answers and drops the rest."""
    body = b"".join(oversized(8 * DEFAULTS.max_request_bytes))
    assert len(body) < DRAIN_BYTES
    request = urllib.request.Request(f"{proxy.url}/generate", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert "limit of" in json.loads(caught.value.read())["detail"]


def test_401_and_429_pass_through_unchanged(keyed_proxy: Proxy, keyed_replicas: Replicas) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 1}

    def seen(response: httpx.Response, header: str) -> tuple:
        return response.status_code, response.json(), response.headers.get(header)

    # No key: 401 with WWW-Authenticate, through the proxy as directly.
    through = httpx.post(f"{keyed_proxy.url}/generate", json=body, timeout=10)
    direct = httpx.post(f"{keyed_replicas.url(1)}/generate", json=body, timeout=10)
    assert seen(through, "www-authenticate") == seen(direct, "www-authenticate")
    assert through.status_code == 401 and through.headers["www-authenticate"] == "Bearer"

    # A full queue (2 waiting, nothing consumes them): 429 with Retry-After.
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed_proxy.url, headers=headers, timeout=10) as client:
        assert [client.post("/generate", json=body).status_code for _ in range(2)] == [202, 202]
        through = client.post("/generate", json=body)
    direct = httpx.post(f"{keyed_replicas.url(0)}/generate", json=body, headers=headers, timeout=10)
    assert seen(through, "retry-after") == seen(direct, "retry-after")
    assert through.status_code == 429 and int(through.headers["retry-after"]) > 0
    assert "queue is full (2 tasks waiting, limit 2)" in through.json()["detail"]


def test_no_replica_is_a_502_in_json(tmp_path: Path) -> None:
    """Every replica gone: nginx's own answer is JSON too, and says when to try again."""
    with nginx_in_front_of([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], tmp_path) as proxy:
        response = httpx.post(f"{proxy.url}/generate", json={"prompt": "Hi"}, timeout=10)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert "no API replica" in response.json()["detail"] and int(response.headers["retry-after"]) > 0


def test_a_request_for_a_gone_replica_goes_to_a_live_one(replicas: Replicas, tmp_path: Path) -> None:
    """proxy_next_upstream: a replica that refuses the connection gets nothing sent, and the request,
    a POST included, goes to the next. nginx tries its replicas in turn, so within two requests one
    is sent to the gone one first; the access log names both replicas it tried."""
    gone, live = f"127.0.0.1:{free_port()}", replicas.addresses[0]
    with nginx_in_front_of([gone, live], tmp_path) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            for _ in range(3):
                assert client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 202
    tried = re.findall(r'"POST /generate HTTP/1.1" 202 .* upstream=(\S+, \S+) ', proxy.log.read_text())
    assert f"{gone}, {live}" in tried


def serving_replica(replicas: Replicas) -> int:
    """The port of the one replica with an open connection: nginx keeps none idle (no upstream
    keepalive), so it is the one serving the stream. The API names no replica in its answers."""
    found: set[int] = set()

    def one_serving() -> bool:
        found.clear()
        found.update(
            c.laddr.port
            for c in psutil.net_connections(kind="tcp4")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in replicas.processes
        )
        return len(found) == 1

    wait_until(one_serving, 10, "one replica with an open connection")
    return found.pop()


def test_a_stream_resumes_on_the_other_replica_when_its_own_is_killed(
    client: httpx.Client, replicas: Replicas
) -> None:
    task_id = submit(client, prompt=STORY, temperature=0, max_new_tokens=1000)  # still running when it is killed
    before: list[ServerSentEvent] = []
    killed = None
    try:
        with connect_sse(client, "GET", f"/task/{task_id}/events", timeout=STREAM_TIMEOUT_S) as source:
            events = source.iter_sse()
            while len([e for e in before if e.event == "chunk"]) < 3:
                before.append(next(events))
            killed = serving_replica(replicas)
            replicas.kill(killed)
            # What was already on its way still arrives; then the stream is cut.
            with pytest.raises(httpx.HTTPError):
                for sse in events:
                    before.append(sse)
        assert before[-1].event == "chunk", "the task ended before its replica was killed"

        # The client reconnects through the proxy, which sends it to the live replica.
        after: list[ServerSentEvent] = []
        headers = {"Last-Event-ID": before[-1].id}
        with connect_sse(client, "GET", f"/task/{task_id}/events", headers=headers, timeout=STREAM_TIMEOUT_S) as source:
            assert source.response.status_code == 200, source.response.read()
            for sse in source.iter_sse():
                after.append(sse)
                if sse.event == "result":
                    break
    finally:
        if killed is not None:
            replicas.start(killed)
            replicas.wait_answering()

    final = TaskView.model_validate(after[-1].json())
    assert after[-1].event == "result" and final.status == TaskStatus.succeeded
    chunks = [e for e in before + after if e.event == "chunk"]
    assert after[0].event == "chunk", "no chunk left for the resumed stream"
    ids = [tuple(int(part) for part in e.id.split("-")) for e in chunks]
    assert ids == sorted(set(ids)), "a chunk repeated or out of order"
    assert "".join(e.json()["text"] for e in chunks) == final.text


def test_metrics_are_not_served_through_the_proxy(proxy: Proxy, replicas: Replicas) -> None:
    """Prometheus scrapes each replica directly; the proxy, which faces clients, does not pass /metrics on."""
    through = httpx.get(f"{proxy.url}/metrics", timeout=30)
    assert through.status_code == 404 and through.json() == {"detail": "not found"}
    assert httpx.get(f"{replicas.url(0)}/metrics", timeout=30).status_code == 200


def test_one_address_holds_a_bounded_number_of_requests_at_once(proxy: Proxy) -> None:
    """64 requests held open (bodies announced, never sent) from one address; the 65th is nginx's 429,
    in JSON with Retry-After; once they close, the address is served again."""
    host, port = proxy.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(64):
            connection = socket.create_connection((host, int(port)), timeout=10)
            connection.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\n\r\n")
            held.append(connection)
        refused = wait_for(lambda: httpx.get(f"{proxy.url}/health", timeout=10), lambda r: r.status_code == 429)
        assert refused.json()["detail"].startswith("too many requests at once") and refused.headers["retry-after"] == "1"
    finally:
        for connection in held:
            connection.close()
    wait_for(lambda: httpx.get(f"{proxy.url}/health", timeout=10), lambda r: r.status_code != 429)


def wait_for(call: Callable[[], httpx.Response], done: Callable[[httpx.Response], bool]) -> httpx.Response:
    """nginx counts a held request once it has read its header: the last few may lag the send."""
    last: httpx.Response | None = None

    def answered() -> bool:
        nonlocal last
        last = call()
        return done(last)

    wait_until(answered, 10, "nginx to count the held requests", interval_s=0.2)
    assert last is not None
    return last

"""Start, watch and stop the stack's processes: one definition for `make run`, the tests and the bench."""

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(name: str = "worker") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO", "-n", f"{name}@%h"]


# Open event streams would hold uvicorn's shutdown for as long as they last: they are cut after
# this, and their clients resume from their last event on the next API.
API_GRACE_S = 2


def api_command(host: str, port: int | str) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port), "--no-access-log",
        "--timeout-graceful-shutdown", str(API_GRACE_S),
    ]


def spawn(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """A process of the stack with its output in `logs/<name>.log`."""
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "wb")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM (a worker hands its running tasks back, uvicorn drains), then SIGKILL after the timeout."""
    stop_all([process], timeout_s)


def stop_all(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM to each at once, then SIGKILL to any still running after the timeout."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def wait_healthy(url: str, processes: dict[str, subprocess.Popen], logs: Path, timeout_s: float = 300) -> None:
    """Until /health answers 200 (Redis up, a worker answered its ping); a process that dies fails at once."""

    def healthy() -> bool:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=timeout_s, what=f"the API at {url} and a worker", interval_s=0.5)


class Stack:
    """A redis-server, workers and an API on free ports, each of which can be stopped and started again.

    For the tests and the bench: each stack has its own redis-server, since Celery's worker
    pings travel over Redis pub/sub, which ignores database numbers.
    """

    def __init__(self, logs: Path, base_env: dict[str, str], **settings: str) -> None:
        self.logs = logs
        self.redis_url = f"redis://127.0.0.1:{free_port()}/0"
        self.env = base_env | {"REDIS_URL": self.redis_url, "API_PORT": str(free_port())} | settings
        self.url = f"http://127.0.0.1:{self.env['API_PORT']}"
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def start_redis(self) -> None:
        from devstack.redis_server import start_redis

        self.redis = start_redis(self.redis_url, self.logs / "redis", self.logs / "redis.log")

    def start_worker(self, name: str = "worker") -> None:
        self.workers[name] = spawn(name, worker_command(name), self.env, self.logs)

    def stop_worker(self, name: str, kill: bool = False) -> None:
        """SIGTERM (it hands its running task back) or SIGKILL (its lease lapses, and another worker takes over)."""
        process = self.workers.pop(name)
        if kill:
            process.kill()
            process.wait()
        else:
            stop(process, timeout_s=60)

    def start_api(self) -> None:
        self.api = spawn("api", api_command("127.0.0.1", self.env["API_PORT"]), self.env, self.logs)

    def up(self) -> "Stack":
        """Redis, one worker and the API, waiting until /health says all answer."""
        self.start_redis()
        self.start_worker()
        self.start_api()
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        assert self.api is not None
        wait_healthy(self.url, {"api": self.api, **self.workers}, self.logs)

    def down(self) -> None:
        for process in [self.api, *self.workers.values(), self.redis]:
            if process is not None:
                stop(process)

"""Real processes for the tests: a redis-server, a Celery worker with the embedded model, the API.

Each is started once per session on free ports and stopped at the end. Waits have deadlines;
nothing sleeps for a fixed time hoping that something happened.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from devstack.redis_server import start_redis
from model_loader.embedded import ensure_converted
from model_loader.source import embedded_dir

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = ROOT / ".cache" / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded model converted to a safetensors folder (once; cached across runs)."""
    return ensure_converted(embedded_dir(Settings(model_cache_dir=MODEL_CACHE)))


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, str]:
    """Environment for every process of the test stack."""
    return os.environ | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MODEL_CACHE_DIR": str(MODEL_CACHE),
        "API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def redis_server(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = stack_env["REDIS_URL"]
    data = tmp_path_factory.mktemp("redis")
    process = start_redis(url, data, data / "redis.log")
    yield url
    process.terminate()
    process.wait(timeout=10)


def _logged(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    log = open(logs / f"{name}.log", "wb")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def start_worker(env: dict[str, str], logs: Path, name: str = "worker") -> subprocess.Popen:
    args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO", "-n", f"{name}@%h"]
    return _logged(name, args, env, logs)


def start_api(env: dict[str, str], logs: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", env["API_PORT"]]
    return _logged("api", args, env, logs)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def wait_healthy(url: str, processes: dict[str, subprocess.Popen], logs: Path) -> None:
    """Until /health answers 200 (Redis up, a worker answered its ping); a process that dies fails at once."""

    def healthy() -> bool:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=300, what=f"the API at {url} and a worker", interval_s=0.5)


@pytest.fixture(scope="session")
def batching_api_url(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second, separate stack whose worker batches two tasks at once on its one model.

    It has its own redis-server: Celery's worker pings travel over Redis pub/sub, which does not
    respect database numbers, so sharing the server would mix the two stacks' workers.
    """
    logs = tmp_path_factory.mktemp("batching")
    env = stack_env | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "API_PORT": str(free_port()),
        "WORKER_CONCURRENCY": "2",
    }
    redis_process = start_redis(env["REDIS_URL"], logs / "redis", logs / "redis.log")
    worker = start_worker(env, logs, name="batching")
    api = start_api(env, logs)
    url = f"http://127.0.0.1:{env['API_PORT']}"
    wait_healthy(url, {"batching": worker, "api": api}, logs)
    yield url
    for process in (api, worker, redis_process):
        _stop(process)


@pytest.fixture(scope="session")
def api_url(redis_server: str, stack_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """The API and one worker, both up: /health answers 200 (a worker answered its ping)."""
    worker = start_worker(stack_env, logs_dir)
    api = start_api(stack_env, logs_dir)
    url = f"http://127.0.0.1:{stack_env['API_PORT']}"
    wait_healthy(url, {"worker": worker, "api": api}, logs_dir)
    yield url
    _stop(api)
    _stop(worker)


@pytest.fixture
def client(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as c:
        yield c

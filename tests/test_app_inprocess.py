"""The API in this process (FastAPI's TestClient) against a real redis-server of its own, with no worker.

Workers are stood in for by the heartbeat entries a live worker writes into Redis, which is all
the API reads of them: whether one is ready, and what its engine can do.
"""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from core.heartbeats import Heartbeats
from core.settings import get_settings
from model_loader.contract import Capabilities
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def redis_url(private_redis: str) -> str:
    return private_redis


@contextmanager
def app_with(redis_url: str, **settings: str) -> Iterator[TestClient]:
    """The app made from the environment's settings, as uvicorn would make it, with these set."""
    from app.main import create_app

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"REDIS_URL": redis_url, "MODEL_CACHE_DIR": str(MODEL_CACHE), **settings}.items():
            env.setenv(name, value)
        get_settings.cache_clear()
        with TestClient(create_app(get_settings())) as client:
            yield client
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def api(redis_url: str, tokenizer_dir: Path) -> Iterator[TestClient]:
    from core.queue import make_celery

    with app_with(redis_url, API_KEYS="") as client:
        # The process's Celery app was made at import, with the settings of that moment.
        client.app.state.services.celery = make_celery()  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def heartbeats(redis_url: str) -> Iterator[Heartbeats]:
    client = redis.Redis.from_url(redis_url)
    client.delete("workers:heartbeat")
    yield Heartbeats(client)
    client.delete("workers:heartbeat")
    client.close()


def beat(heartbeats: Heartbeats, name: str, **capabilities: bool) -> None:
    caps = Capabilities(
        engine="transformers", slots=2, context_tokens=512, seed=True, repetition_penalty=True, grammar=True, logprobs=True,
        penalties=True,
    )
    heartbeats.beat(name, ready=True, capabilities=caps.to_json() | capabilities)


def test_health_is_down_without_a_worker_and_up_with_one(api: TestClient, heartbeats: Heartbeats) -> None:
    down = api.get("/health")
    assert down.status_code == 503 and down.json()["workers"]["ok"] is False
    beat(heartbeats, "w1@host")
    assert api.get("/health").status_code == 200


def test_an_option_a_live_worker_lacks_is_refused_by_name(api: TestClient, heartbeats: Heartbeats) -> None:
    beat(heartbeats, "able@host")
    beat(heartbeats, "batching@host", seed=False, repetition_penalty=False, grammar=False)
    refused = api.post("/generate", json={"prompt": "hi", "seed": 3})
    assert refused.status_code == 422
    detail = refused.json()["detail"][0]
    assert detail["loc"] == ["body", "seed"] and "batching@host" in detail["msg"]
    penalty = api.post("/generate", json={"prompt": "hi", "repetition_penalty": 1.3})
    assert penalty.status_code == 422 and penalty.json()["detail"][0]["loc"] == ["body", "repetition_penalty"]
    schema = api.post("/v1/chat/completions", json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
    })
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "response_format", schema.text


def test_an_option_every_live_worker_has_is_queued(api: TestClient, heartbeats: Heartbeats) -> None:
    beat(heartbeats, "able@host")
    accepted = api.post("/generate", json={"prompt": "hi", "seed": 3, "repetition_penalty": 1.3})
    assert accepted.status_code == 202, accepted.text
    task = api.get(f"/task/{accepted.json()['task_id']}")
    assert task.status_code == 200 and task.json()["status"] == "queued"


def test_each_family_refuses_in_its_own_envelope(api: TestClient) -> None:
    ours = api.post("/generate", json={"prompt": "hi", "max_new_tokens": 0})
    assert ours.status_code == 422 and ours.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
    openai = api.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    llamacpp = api.post("/completion", json={"prompt": "hi", "n_predict": "many"})
    assert llamacpp.status_code == 400 and llamacpp.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_counts_with_the_tokenizer_read_out_of_the_gguf(api: TestClient) -> None:
    tokens = api.post("/tokenize", json={"content": "The capital of France is Paris."}).json()["tokens"]
    detokenized = api.post("/detokenize", json={"tokens": tokens}).json()["content"]
    assert len(tokens) > 3 and detokenized.strip() == "The capital of France is Paris."


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("metadata", {"note": "x" * 1_000_000}, "metadata.note"),
        ("metadata", {"k" * 65: "v"}, "metadata"),
        ("metadata", {f"k{i}": "v" for i in range(17)}, "metadata"),
        ("user", "u" * 257, "user"),
    ],
)
def test_what_a_response_keeps_for_a_day_is_bounded_as_openais(
    api: TestClient, heartbeats: Heartbeats, field: str, value: object, param: str
) -> None:
    """A record lives a day: unbounded metadata would let one caller fill Redis for everyone."""
    beat(heartbeats, "w1@host")
    body = {"model": "SmolLM2-135M-Instruct", "input": "hi", field: value}
    refused = api.post("/v1/responses", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"].startswith(param) and error["type"] == "invalid_request_error"
    assert len(refused.content) < 2000  # the reply does not echo the megabyte back


@pytest.fixture(scope="module")
def keyed_api(redis_url: str, tokenizer_dir: Path) -> Iterator[TestClient]:
    with app_with(redis_url, API_KEYS="the-key") as client:
        yield client


def rejections(client: TestClient) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("queued_llama_request_rejected_total{"))


@pytest.mark.parametrize(
    ("path", "error_of"),
    [("/generate", lambda b: b["detail"]), ("/v1/chat/completions", lambda b: b["error"]["message"]),
     ("/completion", lambda b: b["error"]["message"]), ("/tokenize", lambda b: b["error"]["message"])],
)
@pytest.mark.parametrize("body", [b"{", b'{"prompt": 3}', b"x" * 5000])
def test_a_keyless_call_is_a_401_whatever_its_body_and_moves_no_counter(
    keyed_api: TestClient, path: str, error_of: object, body: bytes
) -> None:
    before = rejections(keyed_api)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = keyed_api.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        assert refused.status_code == 401, refused.text
        assert "API key" in error_of(refused.json())  # type: ignore[operator]
    assert rejections(keyed_api) == before


def test_the_page_and_its_files_load_whole_without_a_key(keyed_api: TestClient) -> None:
    """They are served while the response listens for a disconnect: a key check on that read cut them short."""
    from app.routes.page import STATIC_DIR, STATIC_FILES

    for path, file in [("/", STATIC_DIR / "index.html")] + [(f"/static/{name}", STATIC_DIR / name) for name in STATIC_FILES]:
        served = keyed_api.get(path)
        assert served.status_code == 200 and served.content == file.read_bytes(), path


def test_a_keyed_callers_bad_body_is_still_named_and_counted(keyed_api: TestClient) -> None:
    before = rejections(keyed_api)
    refused = keyed_api.post("/generate", content=b"{", headers={"Authorization": "Bearer the-key"})
    assert refused.status_code == 422
    assert rejections(keyed_api) == before + 1


def test_tokenize_is_bounded_by_the_prompt_limit(api: TestClient) -> None:
    limit = get_settings().max_prompt_chars
    refused = api.post("/tokenize", json={"content": "a" * (limit + 1)})
    assert refused.status_code == 400 and "content" in refused.json()["error"]["message"]
    assert api.post("/tokenize", json={"content": "Hello"}).json()["tokens"]


def test_the_docs_are_served_only_where_the_operator_says(redis_url: str, tokenizer_dir: Path) -> None:
    with app_with(redis_url, PUBLIC_DOCS="false") as client:
        for path in ("/docs", "/openapi.json", "/v1/docs", "/v1/openapi.json"):
            assert client.get(path).status_code == 404, path


def test_a_keys_requests_a_minute_and_kept_bytes_are_its_own_limits(redis_url: str, tokenizer_dir: Path) -> None:
    """Each refusal names the key's limit and says when to come back; the other key goes on."""
    run = uuid.uuid4().hex[:8]  # names of their own, for counts of their own in this module's Redis
    keys = {"a": f"a-{run}", "b": f"b-{run}"}
    limits = {"REQUESTS_PER_MINUTE": "2", "MAX_KEPT_BYTES_PER_KEY": "2500"}
    with app_with(redis_url, API_KEYS=",".join(f"{n}-{run}:{k}" for n, k in keys.items()), **limits) as api:

        def send(name: str, chars: int) -> httpx.Response:
            body = {"prompt": "x" * chars, "max_new_tokens": 1}
            return api.post("/generate", json=body, headers={"Authorization": f"Bearer {keys[name]}"})

        assert [send("a", 10).status_code for _ in range(2)] == [202, 202]
        refused = send("a", 10)
        assert refused.status_code == 429 and "requests this minute" in refused.json()["detail"]
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert send("b", 1000).status_code == 202, "a's rate refused b"

        refused = send("b", 1500)  # 1,000 characters kept already: 2,500 bytes would be passed
        assert refused.status_code == 429 and "bytes of records" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) > 0
        waiting = [line for line in api.get("/metrics").text.splitlines()
                   if line.startswith("queued_llama_key_requests_waiting{") and f'key="a-{run}"' in line]
        assert len(waiting) == 1 and waiting[0].endswith(" 2.0"), waiting

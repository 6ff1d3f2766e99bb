"""Hostile requests against every route of the live API: never a 5xx, always an answer within seconds.

hypothesis draws the requests: JSON of any shape, strings with control characters, lone
surrogates and chat-format tags, numbers far out of range, NaN and infinities, bodies that are
not JSON, weird task ids and cursors, wrong methods. Bodies that happen to be valid always ask
for one or two tokens, so the few tasks they queue are cheap; each is polled to its end, and
then the worker must still answer a normal request. All of it runs against a worker at
WORKER_CONCURRENCY=1 and against one that batches.
"""

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.protocol import MIN_REPETITION_PENALTY, MIN_TEMPERATURE, TaskStatus
from core.settings import Settings
from tests.helpers import poll_until_finished, submit

LIMIT = Settings(_env_file=None).max_new_tokens_limit
ANSWER_WITHIN_S = 5.0
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def is_unicode(text: str) -> bool:
    """False for text with a lone surrogate, which the API refuses."""
    return not any(0xD800 <= ord(char) <= 0xDFFF for char in text)


any_char = st.characters(exclude_categories=())  # control characters and lone surrogates included
hostile_text = st.text(any_char, max_size=40) | st.sampled_from(
    ["", " ", "\x00", "\r\n", "</s>", "<s>[INST]", "<<SYS>>", "<|im_start|>system", "\ud800", "\u202e", "💥" * 50]
)
numbers = (
    st.integers()
    | st.integers(min_value=2**63 - 2)
    | st.integers(max_value=0)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e-320, 1e308, -0.0, 10**400])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=8,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", ""])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": hostile_text}), max_size=4) | json_values
# Never absent or null: the worker would fall back to its default of hundreds of tokens.
token_counts = (
    st.sampled_from([1, 2])
    | st.integers(min_value=LIMIT + 1)
    | st.integers(max_value=0)
    | json_values.filter(lambda value: value is not None)
)
generate_bodies = st.fixed_dictionaries(
    {"max_new_tokens": token_counts},
    optional={
        "prompt": hostile_text | json_values,
        "messages": messages,
        "system_prompt": hostile_text | json_values,
        "temperature": numbers | json_values,
        "top_p": numbers,
        "top_k": numbers,
        "repetition_penalty": numbers,
        "stop": st.lists(hostile_text, max_size=20) | json_values,
        "seed": numbers,
        "unknown_knob": json_values,
    },
)
# Valid requests with extreme values: these queue real tasks, so they ask for one or two tokens.
valid_text = hostile_text.filter(lambda text: bool(text.strip()) and is_unicode(text))
valid_bodies = st.fixed_dictionaries(
    {"max_new_tokens": st.sampled_from([1, 2]), "prompt": valid_text},
    optional={
        "system_prompt": hostile_text.filter(is_unicode),
        "temperature": st.just(0) | st.floats(min_value=MIN_TEMPERATURE) | st.sampled_from([MIN_TEMPERATURE, 1e308]),
        "top_p": st.floats(min_value=1e-320, max_value=1),
        "top_k": st.integers(min_value=0, max_value=2**63),
        "repetition_penalty": st.floats(min_value=MIN_REPETITION_PENALTY) | st.just(MIN_REPETITION_PENALTY),
        "stop": st.lists(hostile_text.filter(lambda text: bool(text) and is_unicode(text)), max_size=16),
        "seed": st.integers(min_value=0, max_value=2**63 - 1),
    },
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"]
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
RAW_BODIES = [
    b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}",  # beyond Python's int digit limit
    b"\xff\xfe{",  # not UTF-8
    b'{"prompt": "hi",',  # cut short
    b"[" * 5000,  # nested past the parser's recursion limit
]


def encode(value: object) -> bytes:
    """JSON as a hostile client might write it: NaN and Infinity allowed, surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


payloads = (
    (valid_bodies | generate_bodies | json_values).map(encode) | st.sampled_from(RAW_BODIES) | st.binary(max_size=64)
)


def quoted(text: str) -> str:
    """Percent-encoded, lone surrogates included, so the server gets the bytes as drawn."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def check(response: httpx.Response) -> None:
    """No 5xx, no slow answer, and every refusal says why."""
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.text[:500]}"
    assert response.elapsed.total_seconds() < ANSWER_WITHIN_S, f"took {response.elapsed}"
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert response.json()["detail"], "a refusal says why"


@pytest.fixture(scope="module", params=["api_url", "batching_api_url"], ids=["sequential", "batching"])
def fuzz_client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """The session's stack, then the one whose worker batches: one hostile request there used to
    stop the decoding thread and fail every task after it."""
    with httpx.Client(base_url=request.getfixturevalue(request.param), timeout=30) as client:
        yield client


def test_generate_never_fails_on_hostile_bodies_and_the_worker_survives(fuzz_client: httpx.Client) -> None:
    accepted: list[str] = []

    @FUZZ
    @given(payload=payloads, content_type=content_types)
    def post(payload: bytes, content_type: str) -> None:
        response = fuzz_client.post("/generate", content=payload, headers={"content-type": content_type})
        check(response)
        if response.status_code == 202:
            accepted.append(response.json()["task_id"])

    post()

    finals = [poll_until_finished(fuzz_client, task_id)[0] for task_id in accepted]
    assert [(f.status, f.error) for f in finals if f.status != TaskStatus.succeeded] == []
    normal = submit(fuzz_client, prompt="What is the capital of France?", max_new_tokens=4)
    final, _ = poll_until_finished(fuzz_client, normal)
    assert final.status == TaskStatus.succeeded and final.text


def test_task_routes_never_fail_on_weird_ids_and_cursors(fuzz_client: httpx.Client) -> None:
    real_id = submit(fuzz_client, prompt="Hi", max_new_tokens=1)
    poll_until_finished(fuzz_client, real_id)
    task_ids = hostile_text | st.just(real_id) | st.uuids().map(str) | st.sampled_from([".", "..", "%", "*", "a" * 65])
    cursors = hostile_text | st.from_regex(r"\d{1,25}-\d{1,25}", fullmatch=True) | st.sampled_from(["0-0", "-1-0", "0"])

    @FUZZ
    @given(task_id=task_ids, cursor=cursors, method=st.sampled_from(["GET", "DELETE"]))
    def visit(task_id: str, cursor: str, method: str) -> None:
        check(fuzz_client.request(method, f"/task/{quoted(task_id)}?after={quoted(cursor)}"))

    visit()


def test_every_path_answers_every_method_without_5xx(fuzz_client: httpx.Client) -> None:
    paths = st.sampled_from(["/generate", "/task/x", "/health", "/", "/docs", "/openapi.json"]) | hostile_text.map(
        lambda text: "/" + quoted(text)
    )

    @FUZZ
    @given(method=st.sampled_from(METHODS), path=paths, body=st.binary(max_size=64))
    def call(method: str, path: str, body: bytes) -> None:
        check(fuzz_client.request(method, path, content=body))

    call()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"prompt": "\\ud800", "max_new_tokens": 1}', "prompt"),
        (b'{"prompt": "hi", "\\udfff": 1, "max_new_tokens": 1}', "unicode"),
        (b'{"prompt": "hi", "temperature": NaN, "max_new_tokens": 1}', "temperature"),
        (b'{"prompt": "hi", "temperature": 1e-320, "max_new_tokens": 1}', "temperature"),
        (b'{"prompt": "hi", "repetition_penalty": 1e-320, "max_new_tokens": 1}', "repetition_penalty"),
    ],
    ids=["lone-surrogate", "surrogate-key", "nan", "tiny-temperature", "tiny-repetition-penalty"],
)
def test_what_the_fuzz_found_is_a_422_naming_the_field(fuzz_client: httpx.Client, payload: bytes, field: str) -> None:
    """Before the fixes, the first three answered 500 and the last two queued tasks that failed."""
    response = fuzz_client.post("/generate", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in response.text


openai_bodies = st.fixed_dictionaries(
    {"model": st.just("SmolLM2-135M-Instruct") | hostile_text, "max_tokens": token_counts, "n_predict": token_counts,
     "max_output_tokens": token_counts},
    optional={
        "input": hostile_text | messages,
        "instructions": hostile_text | json_values,
        "background": st.booleans() | json_values,
        "store": st.booleans() | json_values,
        "metadata": st.dictionaries(hostile_text, hostile_text, max_size=20) | json_values,
        "messages": messages | st.lists(st.fixed_dictionaries({"role": roles, "content": st.lists(
            st.fixed_dictionaries({"type": st.just("text") | hostile_text, "text": hostile_text}), max_size=2)})),
        "prompt": hostile_text | json_values,
        "temperature": numbers,
        "top_p": numbers,
        "stop": hostile_text | st.lists(hostile_text, max_size=20) | json_values,
        "n": numbers,
        "stream": st.booleans() | json_values,
        "logprobs": st.booleans(),
        "tools": json_values,
        "seed": numbers,
        "stream_options": json_values,
        "content": hostile_text | json_values,
        "tokens": st.lists(numbers, max_size=8) | json_values,
        "with_pieces": st.booleans() | json_values,
    },
)


def test_openai_and_llama_cpp_routes_never_fail_on_hostile_bodies(fuzz_client: httpx.Client) -> None:
    """Every refusal is a 4xx in the family's envelope (both have `error.message`); whatever is
    accepted is answered (1 or 2 tokens)."""
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/completion", "/tokenize", "/detokenize"]

    @FUZZ
    @given(path=st.sampled_from(paths),
           payload=openai_bodies.map(encode))
    def post(path: str, payload: bytes) -> None:
        response = fuzz_client.post(path, content=payload, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code < 500, f"{path}: {response.text[:500]}"
        if response.status_code >= 400:
            assert response.json()["error"]["message"], "a refusal says why, in the family's envelope"

    post()


@pytest.mark.parametrize(
    ("path", "rest"),
    [
        ("/v1/chat/completions", b'"messages": [{"role": "user", "content": "hi"}]'),
        ("/v1/completions", b'"prompt": "hi"'),
        ("/v1/responses", b'"input": "hi"'),
    ],
)
def test_a_model_name_holding_a_lone_surrogate_is_a_404_in_openais_envelope(
    fuzz_client: httpx.Client, path: str, rest: bytes
) -> None:
    """What the fuzz found: the refusal quoted the name, and the answer could not be encoded (a 500)."""
    payload = b'{"model": "\\ud800", ' + rest + b"}"
    response = fuzz_client.post(path, content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", response.text

"""The four API doors and the page, end to end, on the engines the session's stack does not run.

The session's stack (tests/conftest.py) runs the default engine, llama.cpp, under every other
suite; here a stack of its own runs transformers, then vLLM (eager: compiling takes minutes), and
each door is asked once through its real client: the `openai` SDK for Chat Completions,
Completions and Responses, llama.cpp's streamed `/completion`, the native `/generate` with its
task view, and the chat page in Chromium. Takeover on each engine is in tests/test_takeover.py.
"""

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from playwright.sync_api import Page, expect

from core.protocol import TaskStatus
from devstack.processes import Stack
from tests.helpers import poll_until_finished, submit
from tests.test_structured import Pet
from tests.test_tools import SCHEMAS, TOOLS
from tests.test_browser import ask, browser, configure, open_page, page, server_view, wait_finished  # noqa: F401

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
ENGINES = {
    "transformers": {"ENGINE": "transformers", "WORKER_CONCURRENCY": "1"},
    "vllm": {"ENGINE": "vllm", "WORKER_CONCURRENCY": "2", "KV_CACHE_TOKENS": "4096", "VLLM_ARGS": "--enforce-eager"},
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine_url(engine: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = Stack(tmp_path_factory.mktemp(f"e2e-{engine}"), stack_env, QUANTIZATION="none", **ENGINES[engine])
    stack.start_redis()
    stack.start_worker(engine)
    stack.start_api()
    stack.wait_healthy()
    yield stack.url
    stack.down()


@pytest.fixture
def sdk(engine_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused", max_retries=0, timeout=180) as client:
        yield client


def test_chat_streams_through_the_sdk_with_usage_last(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                         max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 24


def test_the_sdks_parse_answers_inside_the_schema(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a pet and its owner."}], response_format=Pet,
        temperature=0, max_completion_tokens=300,
    )
    assert completion.choices[0].finish_reason == "stop" and isinstance(completion.choices[0].message.parsed, Pet)


def test_tools_logprobs_and_n_on_this_engine(sdk: openai.OpenAI) -> None:
    """What agents and eval harnesses ask, on each engine: a required call with valid arguments,
    log probabilities, and several choices."""
    called = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        tool_choice="required", temperature=0, max_tokens=100,
    )
    assert called.choices[0].finish_reason == "tool_calls"
    for call in called.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    scored = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8, logprobs=True,
        top_logprobs=2, n=2,
    )
    assert [c.index for c in scored.choices] == [0, 1]
    assert scored.choices[0].message.content == scored.choices[1].message.content, "greedy: the same choice twice"
    for entry in scored.choices[0].logprobs.content:
        assert entry.top_logprobs[0].token == entry.token and entry.logprob <= 0


def test_completions_answer_the_raw_prompt(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens <= 8
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_a_response_streams_to_completed(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Paris" in deltas and events[-1].response.output_text == deltas


def test_llama_cpps_completion_streams_its_own_events(engine_url: str) -> None:
    events = []
    with httpx.stream("POST", f"{engine_url}/completion", timeout=180,
                      json={"prompt": "The capital of France is", "n_predict": 8, "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    *pieces, last = events
    assert pieces and all(p["stop"] is False and p["content"] for p in pieces[1:])
    assert last["stop"] is True and 0 < last["tokens_predicted"] <= 8


def test_generate_answers_with_usage_and_the_engines_memory(engine: str, engine_url: str) -> None:
    with httpx.Client(base_url=engine_url, timeout=30) as client:
        final, _ = poll_until_finished(client, submit(client, prompt=QUESTION, temperature=0, max_new_tokens=24))
    assert final.status == TaskStatus.succeeded and "Paris" in final.text
    assert final.usage and 0 < final.usage.completion_tokens <= 24
    assert final.memory and final.memory.engine == engine and final.memory.peak_bytes > 0


def test_the_page_streams_an_answer(page: Page, engine_url: str) -> None:  # noqa: F811
    open_page(page, engine_url)
    configure(page, temperature="0", max_tokens="24")
    ask(page, QUESTION)
    answer = wait_finished(page)
    with httpx.Client(base_url=engine_url, timeout=30) as client:
        view = server_view(client, answer)
    expect(answer.locator(".text")).to_have_text(view["text"])
    assert "Paris" in view["text"]

"""OpenAI's API on the durable queue, driven by the official `openai` package against the real stack."""

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from core.protocol import TaskStatus
from devstack.processes import wait_until
from tests.extra_api import extra_api
from tests.helpers import poll_until_finished, submit

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_lists_and_retrieves_the_served_model(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("gpt-4")
    assert caught.value.code == "model_not_found"


def test_chat_answers_as_generate_does_and_names_its_task(sdk: openai.OpenAI, client: httpx.Client) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    completion = raw.parse()
    task_id = raw.headers["x-task-id"]
    assert completion.id == f"chatcmpl-{task_id}" and completion.model == MODEL
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert client.get(f"/task/{task_id}").json()["text"] == choice.message.content
    generated, _ = poll_until_finished(client, submit(client, prompt=QUESTION, temperature=0, max_new_tokens=24))
    assert generated.text == choice.message.content, "the same prompt, the same greedy text"


def test_chat_streams_as_the_sdk_expects_with_usage_last(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    whole = sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=24)
    chunks = list(sdk.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=24, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    timings = chunks[-1].model_extra["timings"]  # llama-server's, beside the usage
    assert timings["predicted_n"] == whole.usage.completion_tokens and timings["prompt_per_second"] > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_completions_take_the_raw_prompt(sdk: openai.OpenAI, api_url: str) -> None:
    prompt = "The capital of France is"
    whole = sdk.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    streamed = list(sdk.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert whole.choices[0].text and "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.prompt_tokens < 10, "no chat template or system prompt around it"
    llama = httpx.post(f"{api_url}/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0},
                       timeout=60).json()
    assert llama["content"] == whole.choices[0].text, "the same raw prompt, the same greedy text"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 9}, "n"), ({"logit_bias": {"99999999": 5}}, "logit_bias"), ({"temperature": 5}, "temperature"),
     ({"functions": [{"name": "f"}]}, "functions"), ({"max_tokens": 0}, "max_tokens"),
     ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages")],
)
def test_refusals_are_400s_naming_the_parameter(sdk: openai.OpenAI, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | extra
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**body)
    assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body


def test_a_prompt_the_context_cannot_hold_is_context_length_exceeded(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "lighthouse " * 9000}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model=MODEL, input="lighthouse " * 9000)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"


def test_an_answer_begun_is_gone_on_with(sdk: openai.OpenAI, client: httpx.Client) -> None:
    """A last assistant message is the answer's start (llama-server's prefill, vLLM's continue_final_message):
    the model goes on from it, and the answer is what it adds."""
    begun = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France is"}]
    answer = sdk.chat.completions.create(model=MODEL, messages=begun, temperature=0, max_tokens=8)
    text = answer.choices[0].message.content or ""
    assert "Paris" in text and not text.startswith("The capital"), text
    same = sdk.chat.completions.create(
        model=MODEL, messages=begun, temperature=0, max_tokens=8,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert same.choices[0].message.content == text
    ours, _ = poll_until_finished(client, submit(client, messages=begun, temperature=0, max_new_tokens=8))
    assert ours.text == text
    for extra, messages in (
        ({"continue_final_message": True, "add_generation_prompt": True}, begun),
        ({"continue_final_message": True}, begun[:1]),
        ({"add_generation_prompt": True}, begun),
        ({}, [*begun, {"role": "assistant", "content": " Paris"}]),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=extra)
        assert re.search("continue_final_message|add_generation_prompt|2 or more assistant", str(refused.value))


def test_input_tokens_count_the_prompt_as_the_answer_does(sdk: openai.OpenAI, api_url: str) -> None:
    messages = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
    answer = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert answer.usage is not None
    for path in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"):
        counted = httpx.post(f"{api_url}{path}", json={"messages": messages}, timeout=30)
        assert counted.status_code == 200, counted.text
        assert counted.json() == {"object": "response.input_tokens", "input_tokens": answer.usage.prompt_tokens}
    response = sdk.responses.create(model=MODEL, instructions="Book", input="What is the best book", max_output_tokens=16)
    count = sdk.responses.input_tokens.count(model=MODEL, instructions="Book", input="What is the best book")
    assert response.usage is not None and count.input_tokens == response.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.input_tokens.count(model=MODEL, input="lighthouse " * 9000)
    assert refused.value.code == "context_length_exceeded"


def test_unknown_fields_are_ignored(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"some_extra": 1},
        user="someone",
    )
    assert answer.choices[0].message.content is not None


def test_a_client_that_leaves_a_stream_cancels_its_task(sdk: openai.OpenAI, client: httpx.Client) -> None:
    raw = sdk.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=400, stream=True,
    )
    with raw as response:
        task_id = response.headers["x-task-id"]
        for _, _chunk in zip(range(3), response.parse()):
            pass
    wait_until(lambda: client.get(f"/task/{task_id}").json()["status"] == TaskStatus.cancelled, 30,
               "the abandoned task to be cancelled")


def test_keys_and_a_full_queue_reach_the_sdk_as_its_own_errors(
    api_url: str, redis_server: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    key = "k-" + uuid.uuid4().hex
    overrides = {"API_KEYS": key, "REDIS_URL": redis_server.rsplit("/", 1)[0] + "/3", "MAX_QUEUED_TASKS": "1"}
    with extra_api(stack_env, tmp_path, overrides) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                stranger.models.list()
        with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=5) as owner:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}
            # Queued on a database no worker reads (a stream the SDK closed would cancel its task).
            queued = httpx.post(f"{url}/generate", json={"prompt": "Hi"}, headers={"Authorization": f"Bearer {key}"})
            assert queued.status_code == 202
            with pytest.raises(openai.RateLimitError) as caught:
                owner.chat.completions.create(**body)
    assert int(caught.value.response.headers["retry-after"]) > 0


def test_logit_bias_and_penalties_reach_the_engine(sdk: openai.OpenAI, api_url: str) -> None:
    """Greedy, a banned first token changes the answer's start; penalties change a long answer."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
    plain = sdk.chat.completions.create(**ask, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    tokens = httpx.post(f"{api_url}/tokenize", json={"content": first.token}, timeout=30).json()["tokens"]
    banned = sdk.chat.completions.create(**ask, logit_bias={str(tokens[0]): -100})
    assert not banned.choices[0].message.content.startswith(first.token)
    penalized = sdk.chat.completions.create(**ask, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    llama = httpx.post(f"{api_url}/completion", json={"prompt": "The capital of France is", "n_predict": 4,
                                                       "temperature": 0, "logit_bias": [[tokens[0], False]]}, timeout=60)
    assert llama.status_code == 200 and not llama.json()["content"].startswith(first.token)


def test_n_choices_each_a_task_streamed_or_not(sdk: openai.OpenAI, client: httpx.Client) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12,
           "temperature": 1.0, "seed": 5, "n": 3}
    raw = sdk.chat.completions.with_raw_response.create(**ask)
    answer = raw.parse()
    task_ids = raw.headers["x-task-ids"].split(",")
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(task_ids) == 3
    texts = [c.message.content for c in answer.choices]
    assert texts == [client.get(f"/task/{task_id}").json()["text"] for task_id in task_ids]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    assert answer.usage.completion_tokens == sum(
        client.get(f"/task/{t}").json()["usage"]["completion_tokens"] for t in task_ids
    )
    again = sdk.chat.completions.create(**ask)
    assert [c.message.content for c in again.choices] == texts, "the same seed, the same choices"
    chunks = list(sdk.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]


def test_completions_take_a_batch_of_prompts_and_token_ids(sdk: openai.OpenAI, api_url: str) -> None:
    text = "The capital of France is"
    ids = httpx.post(f"{api_url}/tokenize", json={"content": text, "add_special": True}, timeout=30).json()["tokens"]
    one = sdk.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=6)
    batch = sdk.completions.create(model=MODEL, prompt=[text, "Water is made of"], temperature=0, max_tokens=6, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == one.choices[0].text
    assert batch.choices[2].text != one.choices[0].text
    assert sdk.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6).choices[0].text == one.choices[0].text
    both = sdk.completions.create(model=MODEL, prompt=[ids, ids], temperature=0, max_tokens=6)
    assert [c.text for c in both.choices] == [one.choices[0].text] * 2
    assert both.usage.prompt_tokens == 2 * one.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=MODEL, prompt=[text] * 5, n=2, max_tokens=2)
    assert caught.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    assert caught.value.param == "prompt"


def test_llama_servers_unprefixed_routes_and_stream_options_without_stream(api_url: str) -> None:
    """llama-server answers /models, /chat/completions and /completions beside /v1; OpenAI and vLLM
    refuse stream_options without stream."""
    with openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0) as bare:
        assert [m.id for m in bare.models.list()] == [MODEL]
        chat = bare.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=8)
        assert chat.choices[0].message.content
        assert bare.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4).choices[0].text
        with pytest.raises(openai.BadRequestError) as caught:
            bare.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         stream_options={"include_usage": True})
        assert caught.value.param == "stream_options"


def test_llama_servers_chat_extras_and_what_openai_sends(sdk: openai.OpenAI, api_url: str) -> None:
    """No `model` (the served one answers), llama-server's `grammar` and `json_schema` on chat and a
    json_object's `schema`; chunks leave out what they do not set, and carry a system_fingerprint."""
    chat = httpx.post(f"{api_url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Say yes or no."}], "grammar": 'root ::= "yes" | "no"', "max_tokens": 4,
    }).json()
    assert chat["model"] == MODEL and chat["choices"][0]["message"]["content"] in ("yes", "no")
    assert chat["system_fingerprint"].startswith("fp_")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    for extra in ({"json_schema": schema}, {"response_format": {"type": "json_object", "schema": schema}}):
        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A number?"}],
                                             temperature=0, max_tokens=20, extra_body=extra)
        assert set(json.loads(answer.choices[0].message.content)) == {"n"}
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "stream": True,
    }) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])

"""OpenAI's Responses API on the durable queue, driven by the official `openai` package."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from core.protocol import TaskStatus
from devstack.processes import wait_until
from tests.extra_api import extra_api

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a lighthouse keeper."
OPENING = ["response.created", "response.queued", "response.in_progress", "response.output_item.added",
           "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def finished(sdk: openai.OpenAI, response_id: str) -> openai.types.responses.Response:
    wait_until(lambda: sdk.responses.retrieve(response_id).status not in ("queued", "in_progress"), 120,
               f"{response_id} to end")
    return sdk.responses.retrieve(response_id)


def test_a_response_answers_as_chat_does(sdk: openai.OpenAI, client: httpx.Client) -> None:
    raw = sdk.responses.with_raw_response.create(
        model=MODEL, input=QUESTION, instructions="You are a helpful assistant.", temperature=0, max_output_tokens=24,
        metadata={"ticket": "42"},
    )
    response = raw.parse()
    task_id = raw.headers["x-task-id"]
    assert response.id == f"resp_{task_id}" and response.status in ("completed", "incomplete")
    assert "Paris" in response.output_text and response.metadata == {"ticket": "42"}
    assert response.usage.output_tokens > 0 and response.temperature == 0 and response.max_output_tokens == 24
    assert client.get(f"/task/{task_id}").json()["text"] == response.output_text
    chat = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    assert chat.choices[0].message.content == response.output_text, "the same prompt, the same greedy text"
    assert sdk.responses.retrieve(response.id).output_text == response.output_text


def test_a_background_response_is_polled_to_its_end(sdk: openai.OpenAI) -> None:
    queued = sdk.responses.create(
        model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": STORY}]}],
        max_output_tokens=12, background=True,
    )
    assert queued.status == "queued" and queued.background and queued.output == []
    response = finished(sdk, queued.id)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text and response.usage.output_tokens == 12
    assert response.top_p is not None, "the server's default, resolved when it was queued"


def test_a_dropped_stream_resumes_after_its_last_event(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model=MODEL, input=STORY, temperature=0, max_output_tokens=40, background=True,
                                  stream=True)
    first = [event for _, event in zip(range(8), stream)]
    stream.close()
    assert [e.type for e in first[:5]] == OPENING and first[5].type == "response.output_text.delta"
    response_id = first[0].response.id

    rest = list(sdk.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))
    events = first + rest
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), "an event was repeated or came back in time"
    assert [e.type for e in rest[-4:]] == [*CLOSING, "response.incomplete"]
    final = sdk.responses.retrieve(response_id)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert rest[-4].text == final.output_text

    replay = list(sdk.responses.retrieve(response_id, stream=True))
    assert [(e.type, e.sequence_number) for e in replay] == [(e.type, e.sequence_number) for e in events]


def test_cancel_is_idempotent_and_the_stream_ends_cancelled(sdk: openai.OpenAI) -> None:
    queued = sdk.responses.create(model=MODEL, input=STORY, max_output_tokens=400, background=True)
    stream = sdk.responses.retrieve(queued.id, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    cancelled = sdk.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output_text
    assert sdk.responses.cancel(queued.id).model_dump() == cancelled.model_dump()
    rest = list(stream)
    assert rest[-1].type == "response.cancelled" and rest[-1].response["status"] == "cancelled"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.cancel(sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=2).id)
    assert caught.value.param == "response_id"


def test_a_deleted_response_is_gone(sdk: openai.OpenAI, client: httpx.Client) -> None:
    raw = sdk.responses.with_raw_response.create(model=MODEL, input=STORY, max_output_tokens=400, background=True)
    response = raw.parse()
    sdk.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    assert client.get(f"/task/{raw.headers['x-task-id']}").status_code == 404


def test_an_unstored_response_cannot_be_retrieved(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert response.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_not-a-task")


def test_a_client_that_leaves_a_plain_stream_cancels_its_task(sdk: openai.OpenAI, client: httpx.Client) -> None:
    with sdk.responses.with_streaming_response.create(
        model=MODEL, input=STORY, max_output_tokens=400, stream=True
    ) as raw:
        task_id = raw.headers["x-task-id"]
        for _, _event in zip(range(7), raw.parse()):
            pass
    wait_until(lambda: client.get(f"/task/{task_id}").json()["status"] == TaskStatus.cancelled, 30,
               "the abandoned task to be cancelled")


def test_a_background_stream_outlives_its_client(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model=MODEL, input=STORY, max_output_tokens=16, background=True, stream=True)
    response_id = next(iter(stream)).response.id
    stream.close()
    assert finished(sdk, response_id).status == "incomplete", "closing the stream cancelled it"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"tools": [{"type": "web_search"}]}, "tools"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
     ({"max_output_tokens": 0}, "max_output_tokens"), ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
     ({"background": True, "store": False}, "store"), ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
     ({"instructions": "x", "input": [{"role": "system", "content": "y"}, {"role": "user", "content": "z"}]},
      "input")],
)
def test_refusals_are_400s_naming_the_parameter(sdk: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(**({"model": MODEL, "input": "Hi"} | extra))
    assert caught.value.param == param, caught.value.body


def test_an_unknown_model_is_a_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.create(model="gpt-5", input="Hi")
    assert caught.value.code == "model_not_found"


def test_a_response_is_visible_only_to_the_key_that_made_it(
    redis_server: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    owner_key, other_key = "k-" + uuid.uuid4().hex, "k-" + uuid.uuid4().hex
    overrides = {"API_KEYS": f"{owner_key},{other_key}", "REDIS_URL": redis_server.rsplit("/", 1)[0] + "/4"}
    with extra_api(stack_env, tmp_path, overrides) as url:  # a database no worker reads: it stays queued
        with openai.OpenAI(base_url=f"{url}/v1", api_key=owner_key, max_retries=0) as owner, \
                openai.OpenAI(base_url=f"{url}/v1", api_key=other_key, max_retries=0) as other:
            queued = owner.responses.create(model=MODEL, input="Hi", max_output_tokens=1, background=True)
            for call in (other.responses.retrieve, other.responses.cancel, other.responses.delete):
                with pytest.raises(openai.NotFoundError):
                    call(queued.id)
            assert owner.responses.retrieve(queued.id).status == "queued"
            assert owner.responses.cancel(queued.id).status == "cancelled"

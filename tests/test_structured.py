"""Structured outputs on the real stack (make run's engine, llama.cpp), through the clients people use:
the official SDK's `parse`, LangChain's `with_structured_output`, llama.cpp's `/completion`, and ours.

Every answer is decoded under its schema's grammar, so even the 135M model's JSON parses and validates;
the property test asks for answers to generated schemas at temperature 1, where the model wanders most.
"""

import json
from collections.abc import Iterator
from enum import Enum

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from core.protocol import TaskStatus
from tests.helpers import poll_until_finished, submit

MODEL = "SmolLM2-135M-Instruct"


class Kind(str, Enum):
    cat = "cat"
    dog = "dog"


class Owner(BaseModel):
    name: str = Field(max_length=20)
    city: str = Field(max_length=20)


class Pet(BaseModel):
    name: str = Field(max_length=20)
    kind: Kind
    age: int
    owner: Owner
    toys: list[str] = Field(max_length=3)
    nickname: str | None


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def ask_pet() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Describe a pet and its owner."}]


def test_the_sdks_parse_returns_the_pydantic_model(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.parse(
        model=MODEL, messages=ask_pet(), response_format=Pet, temperature=0, max_completion_tokens=300
    )
    (choice,) = completion.choices
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Pet) and choice.message.parsed.kind in (Kind.cat, Kind.dog)


def test_the_sdks_streamed_parse_ends_with_the_same_model(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.parse(
        model=MODEL, messages=ask_pet(), response_format=Pet, temperature=0, max_completion_tokens=300
    )
    with sdk.chat.completions.stream(
        model=MODEL, messages=ask_pet(), response_format=Pet, temperature=0, max_completion_tokens=300
    ) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1
    assert final.choices[0].message.parsed == whole.choices[0].message.parsed


def test_json_object_mode_answers_a_json_object(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Answer as JSON with "city" and "country": where is the Eiffel Tower?'}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200,
    )
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_responses_text_format_is_followed_and_echoed(sdk: openai.OpenAI) -> None:
    response = sdk.responses.parse(
        model=MODEL, input="Describe a pet and its owner.", text_format=Pet, temperature=0, max_output_tokens=300
    )
    assert response.status == "completed" and isinstance(response.output_parsed, Pet)
    assert response.text.format.type == "json_schema" and response.text.format.schema_["type"] == "object"


def test_a_schema_that_cannot_compile_is_a_400_naming_the_parameter(sdk: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ask_pet(), response_format=bad, max_tokens=8)
    assert caught.value.param == "response_format" and "no-such-type" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "x",
                                                                         "schema": {"type": "no-such-type"}}})
    assert caught.value.param == "text.format"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ask_pet(), response_format={"type": "json_schema"})
    assert caught.value.param == "response_format"


def test_llama_cpps_completion_takes_a_json_schema_and_a_grammar(api_url: str) -> None:
    prompt = "<|im_start|>user\nIs the sky green?<|im_end|>\n<|im_start|>assistant\n"
    grammar = 'root ::= ("yes" | "no") "."'
    answer = httpx.post(f"{api_url}/completion", json={"prompt": prompt, "grammar": grammar, "n_predict": 8},
                        timeout=60).json()
    assert answer["content"] in ("yes.", "no.") and answer["stop_type"] == "eos"
    schema = Pet.model_json_schema()
    answer = httpx.post(f"{api_url}/completion", json={"prompt": prompt, "json_schema": schema, "n_predict": 300,
                                                       "temperature": 0}, timeout=60).json()
    Pet.model_validate_json(answer["content"])
    refused = httpx.post(f"{api_url}/completion", json={"prompt": prompt, "grammar": "root ::= undefined-rule"})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("grammar:")


def test_generate_takes_a_json_schema(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
              "additionalProperties": False}
    task_id = submit(client, prompt="Which city is the capital of France?", json_schema=schema, temperature=0,
                     max_new_tokens=60)
    final, _ = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded and final.finish_reason == "eos"
    jsonschema.validate(json.loads(final.text), schema)
    both = client.post("/generate", json={"prompt": "hi", "json_schema": schema, "grammar": 'root ::= "a"'})
    assert both.status_code == 422 and both.json()["detail"][0]["loc"] == ["body", "grammar"]


def test_langchains_structured_output_and_a_chain(api_url: str) -> None:
    """LangChain's ChatOpenAI as its users write it: `with_structured_output` sends the model's schema as
    `response_format` (strict) and parses the answer back into the model."""
    llm = ChatOpenAI(model=MODEL, base_url=f"{api_url}/v1", api_key="unused", temperature=0, max_tokens=300,
                     max_retries=0)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet and its owner.")
    assert isinstance(pet, Pet)


# Schemas as agents send them: objects of typed, bounded fields, some nested, some optional, some enums.
LEAVES = st.sampled_from([
    {"type": "integer"},
    {"type": "boolean"},
    {"type": "number"},
    {"type": "string", "maxLength": 16},
    {"enum": ["red", "green", "blue"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
])
NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)


def objects(fields: st.SearchStrategy) -> st.SearchStrategy:
    def build(properties: dict, required_flags: list[bool]) -> dict:
        names = list(properties)
        required = [name for name, flag in zip(names, required_flags) if flag]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    return st.dictionaries(NAMES, fields, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(lambda f: build(props, f))
    )


SCHEMAS = objects(st.one_of(LEAVES, objects(LEAVES)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_every_sampled_answer_validates_against_its_generated_schema(sdk: openai.OpenAI, schema: dict, seed: int) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Fill in this form with anything you like."}],
        response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": schema, "strict": True}},
        temperature=1.0, seed=seed, max_tokens=400,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", (schema, choice.message.content)
    jsonschema.validate(json.loads(choice.message.content), schema)

"""Tool calls through the official SDK and LangChain on the real stack (make run's engine, llama.cpp).

`required` and a named function are decoded under the calls' schema, so their arguments always
validate, even from the 135M model; under `auto` the model chooses, in the Hermes format its
prompt describes (prompts/tools.py).
"""

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city now.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                                               "maxLength": 30}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def valid_calls(calls: list) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_function_is_called_with_valid_arguments(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    valid_calls([call])


def test_required_calls_stream_as_the_sdk_accumulates_them(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
    )
    valid_calls(whole.choices[0].message.tool_calls)
    with sdk.chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    streamed = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls]
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]


def test_no_parallel_calls_is_one_call(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
        max_tokens=100,
    )
    assert len(answer.choices[0].message.tool_calls) == 1
    valid_calls(answer.choices[0].message.tool_calls)


def test_tool_choice_none_and_auto_answer_text_or_valid_calls(sdk: openai.OpenAI) -> None:
    none = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    for _ in range(3):
        auto = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=120)
        message = auto.choices[0].message
        if message.tool_calls:
            assert auto.choices[0].finish_reason == "tool_calls"
            valid_calls(message.tool_calls)
        else:
            assert message.content is not None and auto.choices[0].finish_reason in ("stop", "length")


def test_a_full_round_trip_call_result_answer(sdk: openai.OpenAI) -> None:
    first = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    final = sdk.chat.completions.create(
        model=MODEL, messages=conversation, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60
    )
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content


def test_tool_refusals_name_the_parameter(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required", max_tokens=4)
    assert caught.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4,
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[*ASK, {"role": "tool", "content": "x"}], max_tokens=4)
    assert caught.value.param.startswith("messages")


@tool
def get_weather(city: str, unit: str) -> str:
    """The weather in a city now; unit is celsius or fahrenheit."""
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


def test_a_langchain_tool_loop(api_url: str) -> None:
    """LangChain's ChatOpenAI as its users write an agent step: `bind_tools`, run the call, hand back a
    ToolMessage, and read the final answer."""
    llm = ChatOpenAI(model=MODEL, base_url=f"{api_url}/v1", api_key="unused", temperature=0, max_tokens=120,
                     max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    messages += [called, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and final.content and not final.tool_calls


RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


def test_a_response_calls_a_function_and_takes_its_output(sdk: openai.OpenAI) -> None:
    """Responses' flat function tools, a function_call output item, and the call and its
    function_call_output given back in `input` for the final answer."""
    called = sdk.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=RESPONSES_TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_output_tokens=100,
    )
    assert called.status == "completed" and called.tool_choice == "required"
    (call,) = called.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    final = sdk.responses.create(
        model=MODEL, tools=RESPONSES_TOOLS, tool_choice="none", temperature=0, max_output_tokens=60,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
    )
    assert final.status in ("completed", "incomplete") and final.output[0].type == "message" and final.output_text


def test_a_streamed_response_sends_its_call_whole_at_the_end(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(
        model=MODEL, input="What is the weather in Paris?", tools=RESPONSES_TOOLS, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=100,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events)))
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    (call,) = final.output
    assert len(done) == 1 and done[0].arguments == call.arguments and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert events[-1].type == "response.completed"


def test_a_tool_whose_parameters_cannot_compile_is_a_400_naming_tools(sdk: openai.OpenAI) -> None:
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ASK, tools=bad, tool_choice="required", max_tokens=4)
    assert caught.value.param == "tools" and "no-such-type" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model=MODEL, input="hi", tools=[{"type": "function", **bad[0]["function"]}])
    assert caught.value.param == "tools"

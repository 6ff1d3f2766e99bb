"""Log probabilities through each door, as their clients read them, on the real stack (llama.cpp).

Greedy answers make them checkable: each token is the likeliest, so its log probability is its first
alternative's, and the tokens' bytes spell the answer.
"""

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers import poll_until_finished, submit

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def sdk(api_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def greedy_entries(entries: list, top: int) -> None:
    for entry in entries:
        assert len(entry.top_logprobs) == top and entry.logprob <= 0
        first = entry.top_logprobs[0]
        assert first.token == entry.token and math.isclose(first.logprob, entry.logprob, abs_tol=1e-3)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or entry.token.startswith("bytes:")


def test_chat_logprobs_spell_the_answer_streamed_or_not(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=16, logprobs=True,
                                        top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert whole.usage.completion_tokens - 1 <= len(content) <= whole.usage.completion_tokens, "all but an end token"
    greedy_entries(content, 3)
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == whole.choices[0].message.content
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=16,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 3)) for e in streamed] == [(e.token, round(e.logprob, 3)) for e in content]
    plain = sdk.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_in_the_legacy_shape(sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
                                    logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs,
                                                                            logprobs.token_logprobs))


def test_llama_cpps_n_probs(api_url: str) -> None:
    body = {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0, "n_probs": 2}
    result = httpx.post(f"{api_url}/completion", json=body, timeout=60).json()
    probabilities = result["completion_probabilities"]
    assert result["tokens_predicted"] - 1 <= len(probabilities) <= result["tokens_predicted"]
    assert "".join(p["token"] for p in probabilities) == result["content"]
    assert all(p["top_logprobs"][0]["id"] == p["id"] and len(p["top_logprobs"]) == 2 for p in probabilities)
    with httpx.stream("POST", f"{api_url}/completion", json=body | {"stream": True}, timeout=60) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    pieces = [httpx.Response(200, content=line[6:]).json() for line in lines]
    assert [p["id"] for piece in pieces for p in piece.get("completion_probabilities", [])] == [
        p["id"] for p in probabilities
    ]


def test_generate_shows_each_chunks_logprobs(client: httpx.Client) -> None:
    final, _ = poll_until_finished(client, submit(client, prompt=ASK[0]["content"], temperature=0,
                                                  max_new_tokens=8, logprobs=1))
    scored = [token for chunk in final.chunks for token in chunk.logprobs]
    assert len(scored) == final.usage.completion_tokens
    assert all(token_id == top[0][0] and logprob <= 0 for token_id, logprob, top in scored)


def test_logprob_refusals_name_the_parameter(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ASK, top_logprobs=2, max_tokens=2)
    assert caught.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=21, max_tokens=2)
    assert caught.value.param == "top_logprobs"

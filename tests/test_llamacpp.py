"""llama.cpp's native API, called the way its README's examples call it (curl-style httpx, requests)."""

import json

import httpx
import requests

from tests.helpers import poll_until_finished, submit

PROMPT = "Building a website can be done in 10 simple steps:"


def test_completion_with_n_predict_answers_as_llama_cpp_does(api_url: str, client: httpx.Client) -> None:
    """curl --request POST --url http://localhost:8080/completion --data '{"prompt": ..., "n_predict": 128}'"""
    response = httpx.post(f"{api_url}/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0},
                          timeout=180)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["content"] and result["stop"] is True
    assert result["stop_type"] == "limit" and result["stopped_limit"] and not result["stopped_eos"]
    assert result["tokens_predicted"] == 16 and result["tokens_evaluated"] > 0 and result["prompt"] == PROMPT
    timings = result["timings"]
    assert timings["predicted_n"] == 16 and timings["prompt_n"] + timings["cache_n"] == result["tokens_evaluated"]
    assert timings["predicted_per_second"] > 0 and timings["prompt_ms"] > 0
    assert result["generation_settings"]["n_predict"] == 16
    assert {"id_slot", "slot_id", "tokens_cached", "truncated", "model"} <= result.keys()
    task = client.get(f"/task/{response.headers['x-task-id']}").json()
    assert task["text"] == result["content"]
    raw, _ = poll_until_finished(client, submit(client, prompt=PROMPT, raw=True, temperature=0, max_new_tokens=16))
    assert raw.text == result["content"], "the same raw prompt, the same greedy text"


def test_a_stop_word_and_top_k_with_requests(api_url: str) -> None:
    unstopped = requests.post(f"{api_url}/completion", json={"prompt": PROMPT, "n_predict": 24, "temperature": 0},
                              timeout=180).json()
    word = unstopped["content"].split()[2]
    result = requests.post(
        f"{api_url}/completion",
        json={"prompt": PROMPT, "n_predict": 24, "temperature": 0, "stop": [word], "top_k": 40, "cache_prompt": True,
              "id_slot": -1, "seed": -1, "min_p": 0.05},
        timeout=180,
    ).json()
    assert result["stop_type"] == "word" and result["stopped_word"] and result["stopping_word"] == word
    assert result["content"] == unstopped["content"][: unstopped["content"].index(word)]


def test_the_stream_is_llama_cpps_without_done(api_url: str) -> None:
    events = []
    with httpx.stream("POST", f"{api_url}/completion", json={"prompt": PROMPT, "n_predict": 12, "stream": True},
                      timeout=180) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert not line.startswith(("id:", "event:")), line
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    *pieces, last = events
    assert pieces and all(p["stop"] is False and set(p) == {"index", "content", "stop"} for p in pieces)
    assert last["stop"] is True and last["tokens_predicted"] == 12 and last["timings"]["predicted_n"] == 12
    assert "[DONE]" not in json.dumps(events)


def test_tokenize_and_detokenize_round_trip(api_url: str) -> None:
    text = "Hello, world! Ça va? 東京"
    tokens = httpx.post(f"{api_url}/tokenize", json={"content": text}, timeout=30).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = httpx.post(f"{api_url}/detokenize", json={"tokens": tokens}, timeout=30).json()
    assert back == {"content": text}
    pieces = httpx.post(f"{api_url}/tokenize", json={"content": "Hello world", "with_pieces": True}, timeout=30).json()
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"


def test_props_and_errors_in_llama_cpps_envelope(api_url: str) -> None:
    props = httpx.get(f"{api_url}/props", timeout=30).json()
    assert props["total_slots"] == 1 and props["n_ctx"] > 0 and "im_start" in props["chat_template"]
    assert props["default_generation_settings"]["params"]["temperature"] > 0
    bad = httpx.post(f"{api_url}/completion", json={"prompt": PROMPT, "n_predict": 0}, timeout=30)
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and "n_predict" in error["message"]
    unknown = httpx.post(f"{api_url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == 400


def test_a_prompt_of_token_ids_mixed_with_text(client: httpx.Client) -> None:
    text = "The capital of France is"
    ids = client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    plain = client.post("/completion", json={"prompt": text, "n_predict": 6, "temperature": 0}).json()
    as_ids = client.post("/completion", json={"prompt": ids, "n_predict": 6, "temperature": 0}).json()
    mixed = client.post("/completion", json={"prompt": ids[:2] + [" capital of France is"], "n_predict": 6,
                                             "temperature": 0}).json()
    assert as_ids["content"] == plain["content"] and as_ids["tokens_evaluated"] == plain["tokens_evaluated"]
    assert mixed["content"] == plain["content"]
    refused = client.post("/completion", json={"prompt": [10**9], "n_predict": 2})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("prompt:")


def test_a_batch_of_prompts_answers_a_list(client: httpx.Client) -> None:
    """As llama-server reads `prompt`: a list of prompts (text or token ids) is a batch, a task each."""
    text = "I believe the meaning of life is"
    ids = client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    batch = client.post("/completion", json={"prompt": [ids, text], "n_predict": 6, "temperature": 0})
    assert batch.status_code == 200 and len(batch.headers["x-task-ids"].split(",")) == 2
    first, second = batch.json()
    assert first["content"] == second["content"] and [first["index"], second["index"]] == [0, 1]
    with client.stream("POST", "/completion", json={"prompt": [text, text], "n_predict": 6, "temperature": 0,
                                                    "stream": True}) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    for index in (0, 1):
        mine = [e for e in events if e["index"] == index]
        assert "".join(e["content"] for e in mine) == first["content"] and mine[-1]["stop"] is True


def test_response_fields_and_logit_bias_by_text(client: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0}
    plain = client.post("/completion", json=body).json()
    picked = client.post("/completion", json=body | {"response_fields": ["content", "generation_settings/n_predict"]})
    assert picked.json() == {"content": plain["content"], "generation_settings/n_predict": 4}
    first = client.post("/completion", json=body | {"n_probs": 1}).json()["completion_probabilities"][0]["token"]
    banned = client.post("/completion", json=body | {"logit_bias": [[first, False]]}).json()
    assert plain["content"].startswith(first) and not banned["content"].startswith(first)


def test_timings_per_token_in_each_streamed_event(client: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "n_predict": 12, "temperature": 0, "stream": True,
            "timings_per_token": True}
    with client.stream("POST", "/completion", json=body) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    *pieces, last = events
    counts = [piece["timings"]["predicted_n"] for piece in pieces]
    assert counts == sorted(counts) and counts[-1] <= last["timings"]["predicted_n"] == 12
    assert all(piece["timings"]["prompt_n"] == last["timings"]["prompt_n"] > 0 for piece in pieces)


def test_apply_template_shows_the_prompt_a_chat_gives(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hi there"}]
    prompt = client.post("/apply-template", json={"messages": messages}).json()["prompt"]
    assert prompt == ("<|im_start|>system\nYou are a test.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                      "<|im_start|>assistant\n")
    refused = client.post("/apply-template", json={"messages": [{"role": "assistant", "content": "x"}]})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("messages")


def test_a_prompt_the_context_cannot_hold_is_llamas_exceed_context_size_error(api_url: str) -> None:
    """Older history is trimmed to fit; a newest message too long even alone is refused as llama-server does."""
    props = httpx.get(f"{api_url}/props", timeout=30).json()
    for path, body in (
        ("/completion", {"prompt": "lighthouse " * 9000}),
        ("/apply-template", {"messages": [{"role": "user", "content": "lighthouse " * 9000}]}),
    ):
        response = httpx.post(f"{api_url}{path}", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "exceed_context_size_error" and error["n_ctx"] == props["n_ctx"]
        assert error["n_prompt_tokens"] > error["n_ctx"] // 2


def test_a_json_prompt_is_its_text_and_images_are_refused(client: httpx.Client) -> None:
    """llama-server's JSON prompt object; this server's models have no multimodal projector."""
    plain = client.post("/completion", json={"prompt": PROMPT, "n_predict": 6, "temperature": 0}).json()
    as_json = client.post("/completion", json={"prompt": {"prompt_string": PROMPT}, "n_predict": 6, "temperature": 0})
    assert as_json.status_code == 200 and as_json.json()["content"] == plain["content"]
    assert plain["has_new_line"] == ("\n" in plain["content"])
    image = {"prompt_string": "What is this? <__media__>", "multimodal_data": ["iVBORw0KGgo="]}
    refused = client.post("/completion", json={"prompt": image, "n_predict": 4})
    assert refused.status_code == 400 and "multimodal_data" in refused.json()["error"]["message"]

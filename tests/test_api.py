"""The whole path through real processes: API, Redis, a Celery worker and the embedded model."""

import socket
import subprocess
import sys
import uuid

import httpx
import pytest

from core.protocol import TaskStatus
from tests.conftest import ROOT
from tests.helpers import poll_until_finished, submit


def test_health_reports_api_redis_and_workers(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    report = response.json()
    assert report["ok"] and report["api"]["ok"] and report["redis"]["ok"]
    assert report["workers"]["ok"] and report["workers"]["detail"] == "1 ready: worker@" + socket.gethostname()


def test_answer_names_paris_and_reports_stats(client: httpx.Client) -> None:
    task_id = submit(client, prompt="What is the capital of France?", temperature=0, max_new_tokens=48)
    final, seen = poll_until_finished(client, task_id)

    assert final.status == TaskStatus.succeeded, final.error
    assert "Paris" in final.text
    assert "".join(chunk.text for view in seen for chunk in view.chunks) == final.text
    assert final.finish_reason in ("eos", "length")
    assert final.usage and final.usage.prompt_tokens > 5 and 0 < final.usage.completion_tokens <= 48
    assert final.timings and final.timings.generation_s > 0 and final.timings.tokens_per_second > 0
    assert final.timings.total_s >= final.timings.generation_s
    assert final.memory and final.memory.device == "cpu" and 0 < final.memory.model_weight_bytes < final.memory.peak_bytes
    assert final.model == "SmolLM2-135M-Instruct" and final.worker


def test_partial_text_is_visible_before_the_end(client: httpx.Client) -> None:
    task_id = submit(client, prompt="Write a long story about a lighthouse keeper.", temperature=0, max_new_tokens=64)
    final, seen = poll_until_finished(client, task_id)

    assert final.status == TaskStatus.succeeded
    partial = [v for v in seen if v.status == TaskStatus.running and v.chunks]
    assert partial, "no poll saw text before the task finished"
    assert all(v.text is None for v in seen), "a poll with a cursor sends what is new, not the whole text"
    assert "".join(c.text for v in seen for c in v.chunks) == final.text
    assert final.finish_reason == "length" and final.usage and final.usage.completion_tokens == 64


def test_a_poller_gets_each_chunk_once(client: httpx.Client) -> None:
    task_id = submit(client, prompt="Count from one to twenty in words.", temperature=0, max_new_tokens=40)
    final, seen = poll_until_finished(client, task_id)
    cursors = [chunk.cursor for view in seen for chunk in view.chunks]
    assert len(cursors) == len(set(cursors)) > 1
    everything = client.get(f"/task/{task_id}").json()
    assert [c["cursor"] for c in everything["chunks"]] == cursors


def test_unknown_task_is_404(client: httpx.Client) -> None:
    response = client.get(f"/task/{uuid.uuid4()}")
    assert response.status_code == 404
    assert "no task" in response.json()["detail"]


def test_bad_cursor_is_422(client: httpx.Client) -> None:
    task_id = submit(client, prompt="Hi", max_new_tokens=1)
    response = client.get(f"/task/{task_id}", params={"after": "yesterday"})
    assert response.status_code == 422 and "after" in response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
        ({}, "prompt"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "role"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 100_000}, "max_new_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "unknown_knob": 1}, "unknown_knob"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: httpx.Client, body: dict, field: str) -> None:
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_malformed_json_is_422(client: httpx.Client) -> None:
    response = client.post("/generate", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.text


def test_prompt_too_long_for_the_context_is_422(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": "lighthouse " * 9000, "max_new_tokens": 64})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "prompt"] and "limit" in detail["msg"]


def test_api_process_never_imports_torch(tokenizer_dir: object) -> None:
    code = (
        "import sys, app.main; app.main.build_services(); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'API imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "presence_penalty"])
def test_infinite_or_nan_sampling_values_are_422_naming_the_field(client: httpx.Client, field: str) -> None:
    for value in (b"Infinity", b"NaN"):
        body = b'{"prompt": "hi", "max_new_tokens": 1, "' + field.encode() + b'": ' + value + b"}"
        response = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and field in response.text, response.text

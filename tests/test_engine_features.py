"""Streaming, stop strings, seeds, cancellation and batching, through the real stack."""

import time
import uuid

import httpx

from core.protocol import TaskStatus, TaskView
from tests.conftest import wait_until
from tests.helpers import poll_until_finished, submit

JAPANESE = "How do you write 'Tokyo' in Japanese characters?"


def view(client: httpx.Client, task_id: str) -> TaskView:
    return TaskView.model_validate(client.get(f"/task/{task_id}").json())


def streamed(seen: list[TaskView]) -> str:
    return "".join(chunk.text for v in seen for chunk in v.chunks)


def test_chunks_concatenate_to_the_final_text_with_non_ascii(client: httpx.Client) -> None:
    task_id = submit(client, prompt=JAPANESE, temperature=0, max_new_tokens=32)
    final, seen = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded
    assert any(ord(c) > 127 for c in final.text), final.text
    assert streamed(seen) == final.text
    assert len({c.cursor for v in seen for c in v.chunks}) > 1


def test_stop_string_spanning_tokens_ends_generation_and_is_left_out(client: httpx.Client) -> None:
    unstopped, _ = poll_until_finished(client, submit(client, prompt=JAPANESE, temperature=0, max_new_tokens=24))
    stop = " ".join(unstopped.text.split()[4:7])  # three words of this engine's answer: several tokens
    assert len(stop) > 8, unstopped.text
    final, seen = poll_until_finished(
        client, submit(client, prompt=JAPANESE, temperature=0, max_new_tokens=24, stop=[stop])
    )
    assert final.finish_reason == "stop"
    assert final.text == unstopped.text[: unstopped.text.index(stop)]
    assert streamed(seen) == final.text
    assert final.usage and final.usage.completion_tokens < unstopped.usage.completion_tokens  # type: ignore[union-attr]


def test_same_seed_gives_same_text(client: httpx.Client) -> None:
    def sample(seed: int) -> str:
        final, _ = poll_until_finished(
            client, submit(client, prompt=JAPANESE, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=seed)
        )
        return final.text

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_cancel_while_queued_and_while_running(client: httpx.Client) -> None:
    running = submit(client, prompt="Write a long story about a lighthouse keeper.", temperature=0, max_new_tokens=400)
    wait_until(lambda: bool(view(client, running).text), timeout_s=120, what="the first task's first chunk")
    queued = submit(client, prompt="Hi", max_new_tokens=4)
    assert view(client, queued).status == TaskStatus.queued

    answer = client.delete(f"/task/{queued}")
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled"
    answer = client.delete(f"/task/{running}")
    assert answer.status_code == 202 and answer.json()["status"] == "running"

    stopped, _ = poll_until_finished(client, running)
    assert stopped.status == TaskStatus.cancelled and stopped.finish_reason == "cancelled"
    assert stopped.text and stopped.usage and stopped.usage.completion_tokens < 400

    after, _ = poll_until_finished(client, submit(client, prompt="What is the capital of France?", temperature=0))
    assert after.status == TaskStatus.succeeded and "Paris" in after.text
    never_ran = view(client, queued)
    assert never_ran.status == TaskStatus.cancelled and never_ran.finish_reason == "cancelled"
    assert never_ran.attempt == 0 and never_ran.worker is None and never_ran.text == ""

    assert client.delete(f"/task/{running}").status_code == 409
    assert client.delete(f"/task/{uuid.uuid4()}").status_code == 404


def test_two_tasks_stream_at_once_on_one_batching_worker(batching_client: httpx.Client) -> None:
    prompts = ["Write a long story about a lighthouse keeper.", JAPANESE]
    ids = [submit(batching_client, prompt=p, temperature=0, max_new_tokens=40) for p in prompts]
    both_growing = False
    deadline = time.monotonic() + 180
    views = [view(batching_client, i) for i in ids]
    while not all(v.status.finished for v in views):
        assert time.monotonic() < deadline, "tasks did not finish"
        views = [view(batching_client, i) for i in ids]
        both_growing |= all(v.status == TaskStatus.running and v.text for v in views)
        time.sleep(0.02)
    assert both_growing, "the two tasks never streamed at the same time"
    for task_id in ids:
        final, seen = poll_until_finished(batching_client, task_id)
        assert final.status == TaskStatus.succeeded and streamed(seen) == final.text
        assert final.worker and final.worker.startswith("batching@")


def test_batching_worker_cancels_one_task_alone(batching_client: httpx.Client) -> None:
    keep = submit(batching_client, prompt=JAPANESE, temperature=0, max_new_tokens=32)
    drop = submit(batching_client, prompt="Write a long story about a lighthouse keeper.", temperature=0,
                  max_new_tokens=400)
    wait_until(lambda: bool(view(batching_client, drop).text), timeout_s=120, what="the second task's first chunk")
    assert batching_client.delete(f"/task/{drop}").status_code == 202
    dropped, _ = poll_until_finished(batching_client, drop)
    kept, _ = poll_until_finished(batching_client, keep)
    assert dropped.status == TaskStatus.cancelled and dropped.usage and dropped.usage.completion_tokens < 400
    assert kept.status == TaskStatus.succeeded and kept.finish_reason in ("eos", "length")


def test_batching_server_refuses_seed_with_a_clear_422(batching_client: httpx.Client) -> None:
    response = batching_client.post("/generate", json={"prompt": "hi", "seed": 3})
    assert response.status_code == 422 and "WORKER_CONCURRENCY" in response.text

"""Signed webhooks, verified by the official `openai` SDK's `webhooks.unwrap` in a real HTTP receiver."""

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from devstack.processes import free_port, wait_until
from tests.extra_api import extra_api

MODEL = "SmolLM2-135M-Instruct"
SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


class Receiver:
    """An HTTP endpoint that answers 503 while `down` (or for its first `fail_first` posts), else 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.down = False
        self.attempts: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                failing = receiver.down or len(receiver.attempts) < receiver.fail_first
                status = 503 if failing else 200
                receiver.attempts.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> dict[str, list[tuple[dict[str, str], bytes]]]:
        """Each event id answered 200, with every delivery of it."""
        seen: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        for headers, body, status in self.attempts:
            if status == 200:
                seen.setdefault(headers["webhook-id"], []).append((headers, body))
        return seen


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(fail_first=2)
    yield running
    running.server.shutdown()


def settings(receiver: Receiver) -> dict[str, str]:
    return {"WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "WEBHOOK_RETRY_BASE_S": "0.3"}


def events_of(receiver: Receiver, kind: str) -> list[tuple[dict[str, str], bytes]]:
    return [d for deliveries in receiver.delivered().values() for d in deliveries
            if json.loads(d[1])["type"] == kind]


def test_events_arrive_signed_once_after_the_receiver_comes_up(
    receiver: Receiver, api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The session's stack (api_url) runs Redis and the worker; an API of its own sends the events."""
    with extra_api(stack_env, tmp_path_factory.mktemp("webhooks"), settings(receiver)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=8)
        upload = client.files.create(file=("b.jsonl", json.dumps({
            "custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        }).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: bool(events_of(receiver, "response.completed") or events_of(receiver, "response.incomplete"))
                   and bool(events_of(receiver, "batch.completed")), 180, "both events delivered")
        time.sleep(2)  # a repeat, had there been one, would have come by now
        for event_id, deliveries in receiver.delivered().items():
            assert len(deliveries) == 1, f"{event_id} delivered {len(deliveries)} times"
            headers, body = deliveries[0]
            event = client.webhooks.unwrap(body, headers, secret=SECRET)
            assert event.id == event_id and event.data.id in (response.id, batch.id)
        assert receiver.attempts[0][2] == 503 and receiver.attempts[1][2] == 503, "the first attempts failed"
        failed_ids = {headers["webhook-id"] for headers, _, status in receiver.attempts if status == 503}
        assert failed_ids <= set(receiver.delivered()), "an event that failed was delivered later, same id"
        headers, body = events_of(receiver, "batch.completed")[0]
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body.replace(batch.id.encode(), b"batch_forged"), headers, secret=SECRET)


def test_an_api_restart_between_retries_still_delivers(
    api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    receiver = Receiver()
    receiver.down = True
    try:
        logs = tmp_path_factory.mktemp("webhooks-restart")
        with extra_api(stack_env, logs / "first", settings(receiver)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            response = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=8)
            wait_until(lambda: len(receiver.attempts) >= 2, 180, "two failed attempts")
        receiver.down = False
        with extra_api(stack_env, logs / "second", settings(receiver)):
            wait_until(lambda: bool(receiver.delivered()), 60, "the event, from the restarted API")
        (headers, body), = next(iter(receiver.delivered().values()))
        event = client.webhooks.unwrap(body, headers, secret=SECRET)
        assert event.data.id == response.id and event.type in ("response.completed", "response.incomplete")
    finally:
        receiver.server.shutdown()

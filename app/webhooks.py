"""Signed webhooks, as OpenAI sends them: events when a background response or a batch ends.

The operator names the endpoints (WEBHOOK_URL and WEBHOOK_SECRET, or KEY_WEBHOOKS per key name):
callers never give a URL, so no request can make the server call an address of its choosing.
Emitting only adds the event to the outbox in Redis (core.webhooks); every API process runs a
sender that claims due events and posts them, signed with Standard Webhooks' `webhook-id`,
`webhook-timestamp` and `webhook-signature` headers (the `standardwebhooks` package). A receiver
that is down or answers anything but 2xx gets the event again after a wait that doubles each time,
for WEBHOOK_RETRY_FOR_S; the event's id stays the same, for the receiver to drop a repeat. The
sender runs on a thread of its own, so delivery never waits on a request or a generation.
"""

import logging
import time
import uuid
from datetime import datetime, timezone

import httpx
from standardwebhooks.webhooks import Webhook

from app.background import every
from app.deps import Services
from app.openai.responses.convert import response_id, status_of
from core import metrics
from core.settings import Settings
from core.tenants import tenant
from core.webhooks import Outbox, payload
from model_loader.source import model_name

log = logging.getLogger(__name__)

PASS_S = 0.5
SEND_TIMEOUT_S = 10.0
LEASE_S = 60.0  # a claimed event is due again after this, should its sender die mid-send
MAX_WAIT_S = 3600.0
GLOBAL = ""  # the target name of WEBHOOK_URL


def target(settings: Settings, owner: str | None) -> tuple[str, str] | None:
    """(target name, URL) for an owner's events: its key's own, else the server's, else none. Read when the
    object is created and kept with it, so whichever process sees it end sends where it was meant to go."""
    name = tenant(settings, owner).name
    if name in settings.key_webhooks:
        return name, settings.key_webhooks[name].url
    return (GLOBAL, settings.webhook_url) if settings.webhook_url else None


def emit(services: Services, where: tuple[str, str] | None, kind: str, object_id: str) -> None:
    """Add the event for the target its object recorded when it was created (None: nowhere), once: its id is
    derived from the object and what happened to it."""
    if where is None:
        return
    event_id = "evt_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{object_id}").hex
    Outbox(services.redis).add(event_id, where[0], where[1], payload(event_id, kind, object_id))


def watch_response(services: Services, task_id: str, owner: str | None) -> None:
    """A background response emits response.<status> when it ends (if its key has somewhere to send it)."""
    if (where := target(services.settings, owner)) is not None:
        Outbox(services.redis).watch(task_id, where)


async def run(services: Services) -> None:
    await every(PASS_S, Sender(services).pass_once, "a webhook pass")


class Sender:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.outbox = Outbox(services.redis)
        self.http = httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False)

    def pass_once(self) -> None:
        self._ended_responses()
        for event_id in self.outbox.due():
            event = self.outbox.event(event_id)
            secret = self._secret(event["target"]) if event else None
            if event is None or secret is None:
                continue  # another process's settings sign it
            if self.outbox.claim(event_id, LEASE_S):
                self._send(event_id, event, secret)

    def _ended_responses(self) -> None:
        watched = self.outbox.watched()
        for (task_id, where), status in zip(watched.items(), self.services.store.statuses(list(watched))):
            if status is not None and not status.finished:
                continue
            view = self.services.store.view(task_id) if status is not None else None
            if view is not None:
                emit(self.services, where, f"response.{status_of(view)}", response_id(task_id))
            self.outbox.unwatch(task_id)

    def _secret(self, name: str) -> str | None:
        settings = self.services.settings
        if name in settings.key_webhooks:
            return settings.key_webhooks[name].secret.get_secret_value()
        return settings.webhook_secret.get_secret_value() if name == GLOBAL and settings.webhook_url else None

    def _send(self, event_id: str, event: dict[str, str], secret: str) -> None:
        body = event["payload"]
        headers = {"webhook-id": event_id, "webhook-timestamp": str(int(time.time())), "content-type": "application/json"}
        headers["webhook-signature"] = Webhook(secret).sign(
            event_id, datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=timezone.utc), body
        )
        try:
            answered = self.http.post(event["url"], content=body, headers=headers)
            ok, why = answered.is_success, f"HTTP {answered.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, type(exc).__name__
        if ok:
            self.outbox.delivered(event_id)
            self._count("delivered")
            return
        attempts = int(event["attempts"]) + 1
        if time.time() - float(event["created_at"]) >= self.services.settings.webhook_retry_for_s:
            log.warning("webhook %s to %s given up after %d attempts (%s)", event_id, event["url"], attempts, why)
            self.outbox.delivered(event_id)
            self._count("given_up")
            return
        wait = min(MAX_WAIT_S, self.services.settings.webhook_retry_base_s * 2 ** (attempts - 1))
        self.outbox.retry(event_id, wait)
        self._count("failed")
        log.info("webhook %s to %s failed (%s); attempt %d in %.1f s", event_id, event["url"], why, attempts + 1, wait)

    def _count(self, outcome: str) -> None:
        model = model_name(self.services.settings)
        self.services.redis.hincrbyfloat(metrics.KEY, metrics.webhook_deliveries(model, outcome), 1)

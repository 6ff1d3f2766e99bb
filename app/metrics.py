"""`/metrics` in Prometheus's text format: the whole fleet in one scrape of any API process.

Counters and histograms come from the hash every worker and API process adds to (`core.metrics`);
the gauges are read from Redis at scrape time: the queue's length, the leases held (tasks
running), the workers whose heartbeat is fresh, each key's tasks waiting and running, and the
batches in each status. The API also counts each refusal it answers
(`CountRejections`), whichever family's envelope it went out in.
"""

from collections import defaultdict
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import Services
from app.security import key_name
from core import metrics
from core.heartbeats import Heartbeats
from core.store import LEASES_KEY
from model_loader.source import model_name

REJECTIONS = {400, 413, 422, 429}
COUNTER_LABELS = {
    metrics.FINISHED: ["model", "status", "finish_reason"],
    metrics.REJECTED: ["model", "key", "code"],
    metrics.ADMITTED: ["model", "key"],
    metrics.BATCH_LINES: ["model", "outcome"],
    metrics.WEBHOOK_DELIVERIES: ["model", "outcome"],
}


def render(services: Services) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(services))
    return generate_latest(registry)


class FleetCollector:
    """Reads Redis on every scrape: nothing is kept in this process, so every replica answers the same."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.model = model_name(services.settings)

    def collect(self) -> Iterator[Metric]:
        stored = [(*metrics.parse(k.decode()), float(v)) for k, v in self.services.redis.hgetall(metrics.KEY).items()]
        yield from self._gauges()
        yield from _counters(stored)
        yield from _histograms(stored)

    def _gauges(self) -> Iterator[Metric]:
        redis_client: redis.Redis = self.services.redis
        values = {
            "num_requests_waiting": ("Tasks waiting in the queue.", self.services.lanes.waiting()),
            "num_requests_running": ("Tasks a worker holds now.", redis_client.zcard(LEASES_KEY)),
            "workers_online": ("Workers whose heartbeat is fresh.", len(Heartbeats(redis_client).live())),
        }
        for name, (help_text, value) in values.items():
            gauge = GaugeMetricFamily(f"{metrics.PREFIX}{name}", help_text, labels=["model"])
            gauge.add_metric([self.model], value)
            yield gauge
        yield from self._by_key()
        batches = GaugeMetricFamily(f"{metrics.PREFIX}batches", "Batches in each status.", labels=["model", "status"])
        for status, count in sorted(self.services.batches.by_status().items()):
            batches.add_metric([self.model, status], count)
        yield batches

    def _by_key(self) -> Iterator[Metric]:
        """Each key's tasks waiting and running, by the name the operator gave it (never the key)."""
        tenants = self.services.lanes.tenants()
        for name, help_text, count in [
            ("key_requests_waiting", "Tasks waiting in each key's lanes.", lambda c: c.waiting),
            ("key_requests_running", "Tasks of each key released to the workers or running.", lambda c: c.running),
        ]:
            gauge = GaugeMetricFamily(f"{metrics.PREFIX}{name}", help_text, labels=["model", "key"])
            for key, counts in tenants.items():
                gauge.add_metric([self.model, key], count(counts))
            yield gauge


def _counters(stored: list[tuple[str, dict[str, str], float]]) -> Iterator[Metric]:
    for name, help_text in metrics.COUNTERS.items():
        label_names = COUNTER_LABELS.get(name, ["model"])
        family = CounterMetricFamily(name, help_text, labels=label_names)
        for stored_name, labels, value in stored:
            if stored_name == name:
                family.add_metric([labels.get(label, "") for label in label_names], value)
        yield family


def _histograms(stored: list[tuple[str, dict[str, str], float]]) -> Iterator[Metric]:
    for histogram in metrics.HISTOGRAMS:
        buckets: dict[str, dict[str, float]] = defaultdict(dict)
        sums: dict[str, float] = {}
        for name, labels, value in stored:
            if name == f"{histogram.name}_bucket":
                buckets[labels["model"]][labels["le"]] = value
            elif name == f"{histogram.name}_sum":
                sums[labels["model"]] = value
        family = HistogramMetricFamily(histogram.name, histogram.help, labels=["model"])
        for model, counts in buckets.items():
            family.add_metric([model], _cumulative(histogram, counts), sum_value=sums.get(model, 0.0))
        yield family


def _cumulative(histogram: metrics.Histogram, counts: dict[str, float]) -> list[tuple[str, float]]:
    """Each bucket stored holds the observations that first fit it; Prometheus's hold all below the bound."""
    total = 0.0
    out = []
    for bound in [*map(repr, histogram.buckets), "+Inf"]:
        total += counts.get(bound, 0.0)
        out.append((bound, total))
    return out


class CountRejections:
    """ASGI middleware: each 400, 413, 422 and 429 the API answers a caller with a valid key (any
    caller, on an open server) adds one to the fleet's count."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        name = key_name(scope)

        async def counting(message: Message) -> None:
            if name is not None and message["type"] == "http.response.start" and message["status"] in REJECTIONS:
                await _count(scope, name, message["status"])
            await send(message)

        await self.app(scope, receive, counting)


def count_admitted(services: Services, key: str) -> None:
    services.redis.hincrbyfloat(metrics.KEY, metrics.admitted(model_name(services.settings), key), 1)


async def _count(scope: Scope, name: str, status: int) -> None:
    services: Services = scope["app"].state.services
    try:
        await services.aredis.hincrbyfloat(metrics.KEY, metrics.rejected(model_name(services.settings), name, status), 1)
    except redis.RedisError:  # Redis away: the refusal itself says so (503s are not counted here)
        pass

"""Worker heartbeats in Redis: how `/health` knows which workers can take tasks, without asking them.

Each worker process writes its state into one hash every `BEAT_S`; the API reads that hash in
one command. Pinging the workers through Celery instead held an API thread for a whole second
per `/health` call, so a few dozen callers starved every other route.
"""

import json
import time
from dataclasses import dataclass, field

import redis

KEY = "workers:heartbeat"
BEAT_S = 2.0
# A worker silent for this long is gone: dead, frozen, or cut off from Redis.
STALE_S = 3 * BEAT_S
# Entries this old are removed, so that workers which left leave no trace.
FORGET_S = 60.0


@dataclass(frozen=True)
class WorkerState:
    name: str
    ready: bool
    seen_at: float
    slots: int = 1  # tasks it runs at once (WORKER_CONCURRENCY)
    # What its engine can do (model_loader.contract.Capabilities as JSON): {"engine", "seed", ...}.
    capabilities: dict = field(default_factory=dict)


class Heartbeats:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def beat(self, name: str, ready: bool, capabilities: dict) -> None:
        """`ready` False says the worker is alive but cannot generate now (its engine is recovering)."""
        state = {"ready": ready, "at": time.time(), "slots": capabilities["slots"], "capabilities": capabilities}
        self.redis.hset(KEY, name, json.dumps(state))

    def remove(self, name: str) -> None:
        self.redis.hdel(KEY, name)

    def live(self) -> list[WorkerState]:
        """Workers heard from within `STALE_S`, by name; forgets those silent past `FORGET_S`."""
        now = time.time()
        states = [_parse(name, value) for name, value in self.redis.hgetall(KEY).items()]
        forgotten = [s.name for s in states if now - s.seen_at > FORGET_S]
        if forgotten:
            try:
                self.redis.hdel(KEY, *forgotten)
            except redis.ResponseError:  # Redis refusing writes (out of memory): forget them next time
                pass
        return sorted((s for s in states if now - s.seen_at <= STALE_S), key=lambda s: s.name)


def _parse(name: bytes, value: bytes) -> WorkerState:
    fields = json.loads(value)
    return WorkerState(
        name=name.decode(), ready=bool(fields["ready"]), seen_at=float(fields["at"]), slots=int(fields.get("slots", 1)),
        capabilities=fields.get("capabilities") or {},
    )

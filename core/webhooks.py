"""The webhook outbox in Redis: events waiting to be delivered, at least once, across restarts.

Per event a hash `webhook:{id}` (its target's name, URL, payload, attempts, creation time) and its
place in the sorted set `webhooks:outbox`, scored by when it is next due. An event is added once
(its id is derived from what happened, so a second emitter finds it there). A sender claims a due
event by moving its score a lease ahead, in one script, so two API processes do not send it at
once; it then removes it when delivered, or scores it for its next attempt. Responses that will
emit an event when they end wait in the hash `webhooks:watching`, with the target they were created for.
"""

import json
import time

import redis

from core.redis_client import text

OUTBOX_KEY = "webhooks:outbox"
WATCHING_KEY = "webhooks:watching"

# KEYS: event, outbox. ARGV: due (ms), then field/value pairs. Returns 1 when added, 0 when it was there.
_ADD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], ARGV[1], string.sub(KEYS[1], 9))
return 1
"""

# KEYS: outbox. ARGV: event id, now (ms), lease until (ms). Returns 1 when claimed (it was due).
_CLAIM_LUA = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


class Outbox:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._add = client.register_script(_ADD_LUA)
        self._claim = client.register_script(_CLAIM_LUA)

    def add(self, event_id: str, target: str, url: str, payload: str) -> bool:
        fields = {"target": target, "url": url, "payload": payload, "attempts": 0, "created_at": time.time()}
        pairs = [item for pair in fields.items() for item in pair]
        return bool(self._add(keys=[_event_key(event_id), OUTBOX_KEY], args=[_now_ms(), *pairs]))

    def due(self, limit: int = 32) -> list[str]:
        return [text(i) for i in self._redis.zrangebyscore(OUTBOX_KEY, "-inf", _now_ms(), start=0, num=limit)]

    def event(self, event_id: str) -> dict[str, str] | None:
        record = self._redis.hgetall(_event_key(event_id))
        return {text(k): text(v) for k, v in record.items()} if record else None

    def claim(self, event_id: str, lease_s: float) -> bool:
        now = _now_ms()
        return bool(self._claim(keys=[OUTBOX_KEY], args=[event_id, now, now + int(lease_s * 1000)]))

    def delivered(self, event_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(OUTBOX_KEY, event_id)
        pipe.delete(_event_key(event_id))
        pipe.execute()

    def retry(self, event_id: str, after_s: float) -> int:
        """Due again `after_s` from now; the attempts made so far."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(_event_key(event_id), "attempts", 1)
        pipe.zadd(OUTBOX_KEY, {event_id: _now_ms() + int(after_s * 1000)})
        return int(pipe.execute()[0])

    def watch(self, task_id: str, where: tuple[str, str]) -> None:
        self._redis.hset(WATCHING_KEY, task_id, json.dumps(where))

    def watched(self) -> dict[str, tuple[str, str]]:
        """Each watched task's target: its name and URL."""
        return {text(k): tuple(json.loads(v)) for k, v in self._redis.hgetall(WATCHING_KEY).items()}  # type: ignore[misc]

    def unwatch(self, task_id: str) -> None:
        self._redis.hdel(WATCHING_KEY, task_id)


def _event_key(event_id: str) -> str:
    return f"webhook:{event_id}"  # the add script reads the id back from after its 8 characters


def _now_ms() -> int:
    return int(time.time() * 1000)


def payload(event_id: str, kind: str, object_id: str) -> str:
    """OpenAI's event: what happened and to which object; the receiver fetches the object itself."""
    return json.dumps({"object": "event", "id": event_id, "type": kind, "created_at": int(time.time()),
                       "data": {"id": object_id}})

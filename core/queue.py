"""The queue's contract, in one place: Celery's names and settings, and the fair lanes in front of it.

A new task does not go to Celery's queue when it is admitted. It waits in a lane of its own
tenant (`core.tenants`: one per API key, one shared without keys) and class (interactive, or
background: Responses with `background`, `service_tier: flex`). A lane's tasks are released to
Celery only as worker slots free (the ready workers' slots, less the tasks running or released
and not yet started), so Celery's queue stays about as short as the free slots, and the order
of work is decided here, not by arrival:

- between classes, by stride scheduling: background gets BACKGROUND_SHARE of the releases while
  both have work, interactive the rest, and neither banks credit while the other is idle; and
  while no interactive work waits, background work leaves the last INTERACTIVE_SLOTS slots free
  (unless the fleet has no more than that), so an interactive request arriving behind a batch
  finds a slot at once; and for INTERACTIVE_ACTIVE_S after an interactive task is released,
  background work holds at most BACKGROUND_ACTIVE_SHARE of the slots (at least one), so the
  engines that run the interactive work also run little else: on a CPU every stream decoding
  beside a new prompt delays its first token;
- within a class, by stride scheduling over the lanes with work (weighted fair queueing, one
  release costing 1/weight of a lane's pass): the lane with the lowest pass goes next, and a
  lane that comes back after idling starts at the class's current pass, never behind it. A
  tenant at its MAX_RUNNING cap is passed over until one of its tasks ends.

A task taken over from a worker (it died, stopped, or its engine failed) skips the lanes: it goes
to Celery at once, ahead of every released task (kombu priority 0), since its reader is waiting
mid-answer. Every release runs in one Lua script, so any number of APIs and workers may release
at once; a process that dies between a release and its message leaves the task in `released`,
where the next scan sends it again after RESEND_AFTER_MS (a duplicate delivery is never run).

Redis, per task: a member in its lane (ZSET, by arrival) while it waits, then in `released`
until a worker starts it, and in its tenant's running set (and, background work, the background
set) until it ends; per tenant and class, a lane's pass. The store's scripts (`core.store`) take
a task out of these as it starts or ends.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery

from core.heartbeats import Heartbeats
from core.redis_client import broker_transport_options, broker_url
from core.settings import Settings, get_settings
from core.tenants import Tenant

GENERATE_TASK = "generate"
QUEUE = "chat"
# kombu's Redis transport serves lower numbers first: a takeover goes ahead of every released task.
NEW_TASK_PRIORITY = 3
TAKEOVER_PRIORITY = 0
# How often a live worker looks for tasks a dead worker held past the visibility timeout (the last
# resort behind the leases). kombu's default scans only every 10th 10 s tick.
RESTORE_SCAN_S = 5

INTERACTIVE = "interactive"
BACKGROUND = "background"
CLASSES = (INTERACTIVE, BACKGROUND)
RELEASED_KEY = "queue:released"  # ZSET task id -> when released (ms, Redis's clock)
BACKGROUND_KEY = "queue:background"  # SET of background task ids released or running
INTERACTIVE_AT_KEY = "queue:interactive_at"  # when an interactive task was last released (ms, Redis's clock)
CLASS_PASSES_KEY = "queue:class_passes"  # HASH class -> pass
POLICY_KEY = "queue:policy"  # HASH tenant -> "weight max_running", written at each admission
# A released task whose worker has not started it after this is sent again (its sender died, or
# Redis lost the message with its unsynced writes).
RESEND_AFTER_MS = 30_000


def lane_key(task_class: str, tenant: str) -> str:
    return f"queue:lane:{task_class}:{tenant}"


def lanes_key(task_class: str) -> str:
    """ZSET tenant -> pass, of the class's lanes that hold work."""
    return f"queue:lanes:{task_class}"


def passes_key(task_class: str) -> str:
    """HASH tenant -> pass, kept for a lane that emptied (and class -> the class's current pass)."""
    return f"queue:passes:{task_class}"


def running_key(tenant: str) -> str:
    """SET of the tenant's task ids released or running: its MAX_RUNNING count."""
    return f"queue:running:{tenant}"


# A record's `lane` and `class` fields name its queue keys, so that the store's scripts can take a
# task out of them as it starts or ends (one Redis: the keys are named inside the script).
# KEYS[1]: record, then `released`. ARGV[1]: task id. Run by the store when a task ends.
LEAVE_LUA = """
local function leave_queue(record, released, id)
  redis.call('ZREM', released, id)
  redis.call('SREM', 'queue:background', id)
  local tenant, class = redis.call('HGET', record, 'lane'), redis.call('HGET', record, 'class')
  if not tenant then return end
  redis.call('SREM', 'queue:running:' .. tenant, id)
  local lane = 'queue:lane:' .. class .. ':' .. tenant
  if redis.call('ZREM', lane, id) == 1 and redis.call('ZCARD', lane) == 0 then
    local pass = redis.call('ZSCORE', 'queue:lanes:' .. class, tenant)
    if pass then
      redis.call('HSET', 'queue:passes:' .. class, tenant, pass)
      redis.call('ZREM', 'queue:lanes:' .. class, tenant)
    end
  end
end
"""

# KEYS: record, lane, the class's lanes, the class's passes, policy. ARGV: task id, tenant, weight,
# max running, class, request. Puts a queued task at the back of its lane; a lane that had no
# work joins at the class's current pass (or its own, if that is further on). The record no
# longer expires while it waits, however long the backlog.
_ENQUEUE_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local clock = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(clock[1]) * 1000000 + tonumber(clock[2]), ARGV[1])
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  local own = tonumber(redis.call('HGET', KEYS[4], ARGV[2]) or '0')
  local now = tonumber(redis.call('HGET', KEYS[4], '') or '0')
  redis.call('ZADD', KEYS[3], math.max(own, now), ARGV[2])
end
redis.call('HSET', KEYS[5], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
redis.call('HSET', KEYS[1], 'lane', ARGV[2], 'class', ARGV[5], 'request', ARGV[6])
redis.call('PERSIST', KEYS[1])
return 1
"""

# KEYS: released, leases, class passes, policy, background, interactive_at. ARGV: capacity (the ready
# slots), background share, slots kept for interactive work, background's share of the slots while
# interactive work is active, how long (ms) it stays active after a release. Releases tasks while fewer than
# `capacity` are released or running (background ones, while no interactive work waits, only while fewer
# than `capacity` less the kept slots, at least one; and while interactive work is active, only while fewer
# background ones than its share of the slots, at least one); returns {id, request, ...}.
_RELEASE_LUA = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local capacity, share = tonumber(ARGV[1]), tonumber(ARGV[2])
local class_weight = {interactive = 1 - share, background = share}
local busy = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local background_limit = math.max(1, capacity - tonumber(ARGV[3]))
local active_limit = math.max(1, math.floor(capacity * tonumber(ARGV[4])))
local interactive_at = tonumber(redis.call('GET', KEYS[6]) or '0')
local background = nil  -- background tasks in flight, counted only once interactive work is active
local out = {}

local function count_background()
  background = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do  -- one whose record is gone ended unseen
    if redis.call('EXISTS', 'task:' .. id) == 1 then background = background + 1 else redis.call('SREM', KEYS[5], id) end
  end
end

-- Whether background work may take a slot now: not the kept ones unless interactive work waits too
-- (then the shares decide), and no more than its share while interactive work is active.
local function background_may(interactive_waits)
  if busy >= background_limit and not interactive_waits then return false end
  if now_ms - interactive_at >= tonumber(ARGV[5]) then return true end
  if not background then count_background() end
  return background < active_limit
end

local function policy(tenant)
  local p = redis.call('HGET', KEYS[4], tenant)
  if not p then return 1, 0 end
  local weight, cap = string.match(p, '(%S+) (%S+)')
  return tonumber(weight), tonumber(cap)
end

-- The class's lane with the lowest pass whose tenant is under its running cap.
local function next_lane(class)
  local lanes = redis.call('ZRANGE', 'queue:lanes:' .. class, 0, -1, 'WITHSCORES')
  for i = 1, #lanes, 2 do
    local weight, cap = policy(lanes[i])
    if cap == 0 or redis.call('SCARD', 'queue:running:' .. lanes[i]) < cap then
      return {tenant = lanes[i], pass = tonumber(lanes[i + 1]), weight = weight}
    end
  end
  return nil
end

while busy < capacity do
  local chosen, lane, pass = nil, nil, nil
  local ready = {}
  for _, class in ipairs({'interactive', 'background'}) do
    if class == 'interactive' or background_may(ready.interactive) then ready[class] = next_lane(class) end
    local class_pass = tonumber(redis.call('HGET', KEYS[3], class) or '0')
    if ready[class] and (not chosen or class_pass < pass) then chosen, lane, pass = class, ready[class], class_pass end
  end
  if not chosen then break end
  for _, class in ipairs({'interactive', 'background'}) do  -- an idle class banks no credit
    if not ready[class] and tonumber(redis.call('HGET', KEYS[3], class) or '0') < pass then
      redis.call('HSET', KEYS[3], class, pass)
    end
  end
  local lane_name = 'queue:lane:' .. chosen .. ':' .. lane.tenant
  local id = redis.call('ZRANGE', lane_name, 0, 0)[1]
  if id then redis.call('ZREM', lane_name, id) end
  if id and redis.call('HGET', 'task:' .. id, 'status') == 'queued' then
    local record = 'task:' .. id
    redis.call('ZADD', KEYS[1], now_ms, id)
    redis.call('SADD', 'queue:running:' .. lane.tenant, id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', record, 'request') or '')
    busy = busy + 1
    if chosen == 'background' then
      if background then background = background + 1 end
      redis.call('SADD', KEYS[5], id)
    else
      interactive_at = now_ms
      redis.call('SET', KEYS[6], now_ms)
    end
    redis.call('HINCRBYFLOAT', KEYS[3], chosen, 1 / class_weight[chosen])
    redis.call('HSET', 'queue:passes:' .. chosen, '', lane.pass)
    redis.call('ZINCRBY', 'queue:lanes:' .. chosen, 1 / lane.weight, lane.tenant)
  end
  if redis.call('ZCARD', lane_name) == 0 then
    redis.call('HSET', 'queue:passes:' .. chosen, lane.tenant, redis.call('ZSCORE', 'queue:lanes:' .. chosen, lane.tenant))
    redis.call('ZREM', 'queue:lanes:' .. chosen, lane.tenant)
  end
end
return out
"""

# KEYS: released. ARGV: how long ago (ms) a release counts as lost. Released tasks still queued
# after that are marked released now and returned {id, request, ...}, to be sent again; those a
# worker started or that ended are dropped from the set.
_OVERDUE_LUA = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[1]), 'LIMIT', 0, 16)) do
  local record = 'task:' .. id
  if redis.call('HGET', record, 'status') == 'queued' then
    redis.call('ZADD', KEYS[1], now_ms, id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', record, 'request') or '')
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: record, released, Celery's takeover list. ARGV: task id, background share. A task's place:
# released tasks and takeovers go first. A waiting task's lane is passed over by stride scheduling,
# so the tasks of another lane of its class that go before it are those whose pass comes first
# (a lane's tasks stand at its pass, its pass plus 1/weight, and so on); the other class adds its
# share of as many releases. False once the task has started or ended.
_PLACE_LUA = """
local takeovers = redis.call('LLEN', KEYS[3])
local released_rank = redis.call('ZRANK', KEYS[2], ARGV[1])
if released_rank then return takeovers + released_rank end
local tenant, class = redis.call('HGET', KEYS[1], 'lane'), redis.call('HGET', KEYS[1], 'class')
if not tenant then return false end
local rank = redis.call('ZRANK', 'queue:lane:' .. class .. ':' .. tenant, ARGV[1])
if not rank then return false end
local before = takeovers + redis.call('ZCARD', KEYS[2])
local function weight(name)
  local policy = redis.call('HGET', 'queue:policy', name)
  return policy and tonumber(string.match(policy, '(%S+)')) or 1
end
local lanes = redis.call('ZRANGE', 'queue:lanes:' .. class, 0, -1, 'WITHSCORES')
local own = redis.call('ZSCORE', 'queue:lanes:' .. class, tenant)
if not own then return before + rank end
local my_turn = tonumber(own) + rank / weight(tenant)
local same = 0
for i = 1, #lanes, 2 do
  local pass = tonumber(lanes[i + 1])
  if lanes[i] ~= tenant and pass <= my_turn then
    local length = redis.call('ZCARD', 'queue:lane:' .. class .. ':' .. lanes[i])
    same = same + math.min(length, math.floor((my_turn - pass) * weight(lanes[i])) + 1)
  end
end
local other = class == 'interactive' and 'background' or 'interactive'
local others = 0
local other_lanes = redis.call('ZRANGE', 'queue:lanes:' .. other, 0, -1)
for _, name in ipairs(other_lanes) do others = others + redis.call('ZCARD', 'queue:lane:' .. other .. ':' .. name) end
local share = tonumber(ARGV[2])
local ratio = class == 'interactive' and share / (1 - share) or (1 - share) / share
return before + rank + same + math.min(others, math.floor((rank + same + 1) * ratio))
"""

Send = Callable[[str, dict], None]


@dataclass(frozen=True)
class Priority:
    """How background work gives way to interactive work (see the module's docstring); the defaults keep
    nothing back beyond the shares."""

    background_share: float  # of the releases, while both classes wait
    interactive_slots: int = 0  # slots background work leaves free while no interactive work waits
    active_share: float = 1.0  # of the slots, what background work may hold while interactive work is active
    active_ms: int = 0  # how long interactive work stays active after one of its tasks is released

    @classmethod
    def of(cls, settings: Settings) -> "Priority":
        return cls(settings.background_share, settings.interactive_slots, settings.background_active_share,
                   round(settings.interactive_active_s * 1000))


@dataclass(frozen=True)
class LaneCounts:
    """A tenant's tasks waiting (both classes) and released or running."""

    waiting: int
    running: int


class Lanes:
    """The lanes in Redis: what the API puts in and the releases that workers and APIs make."""

    def __init__(self, client: redis.Redis, leases_key: str) -> None:
        self.redis = client
        self._leases_key = leases_key
        self._enqueue = client.register_script(_ENQUEUE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._overdue = client.register_script(_OVERDUE_LUA)
        self._place = client.register_script(_PLACE_LUA)

    def enqueue(self, task_id: str, tenant: Tenant, task_class: str, request: dict) -> None:
        """Put a recorded task in its lane (nothing, if it was cancelled meanwhile)."""
        keys = [f"task:{task_id}", lane_key(task_class, tenant.name), lanes_key(task_class),
                passes_key(task_class), POLICY_KEY]
        args = [task_id, tenant.name, tenant.weight, tenant.max_running, task_class, json.dumps(request)]
        self._enqueue(keys=keys, args=args)

    def release(self, send: Send, priority: Priority) -> int:
        """Release as many tasks as there are free slots, and send each, background work giving way to
        interactive work as `priority` says; returns how many."""
        capacity = sum(worker.slots for worker in Heartbeats(self.redis).live() if worker.ready)
        if not capacity:
            return 0
        keys = [RELEASED_KEY, self._leases_key, CLASS_PASSES_KEY, POLICY_KEY, BACKGROUND_KEY, INTERACTIVE_AT_KEY]
        args = [capacity, priority.background_share, priority.interactive_slots, priority.active_share,
                priority.active_ms]
        released = self._release(keys=keys, args=args)
        return _send_all(released, send)

    def resend_overdue(self, send: Send) -> int:
        """Send again the released tasks that no worker started within RESEND_AFTER_MS."""
        return _send_all(self._overdue(keys=[RELEASED_KEY], args=[RESEND_AFTER_MS]), send)

    def counts(self, tenant: str) -> LaneCounts:
        pipe = self.redis.pipeline(transaction=False)
        for task_class in CLASSES:
            pipe.zcard(lane_key(task_class, tenant))
        pipe.scard(running_key(tenant))
        interactive, background, running = pipe.execute()
        return LaneCounts(waiting=interactive + background, running=running)

    def tenants(self) -> dict[str, LaneCounts]:
        """Every tenant the queue has seen (written to the policy hash at admission), with its counts."""
        names = sorted(name.decode() for name in self.redis.hkeys(POLICY_KEY))
        return {name: self.counts(name) for name in names}

    def waiting(self) -> int:
        """Tasks in the lanes and released but not started: all that waits for a slot."""
        pipe = self.redis.pipeline(transaction=False)
        for task_class in CLASSES:
            pipe.zrange(lanes_key(task_class), 0, -1)
        lanes = pipe.execute()
        for task_class, tenants in zip(CLASSES, lanes):
            for tenant in tenants:
                pipe.zcard(lane_key(task_class, tenant.decode()))
        pipe.zcard(RELEASED_KEY)
        pipe.llen(QUEUE)
        return sum(pipe.execute())

    def place(self, task_id: str, share: float) -> int | None:
        """How many tasks will start before this one; None once it has started or ended. One script,
        whatever the lanes' lengths (see `_PLACE_LUA`)."""
        ahead = self._place(keys=[f"task:{task_id}", RELEASED_KEY, QUEUE], args=[task_id, share])
        return None if ahead is None else int(ahead)


def _send_all(flat: list, send: Send) -> int:
    """Send each released (id, request) pair; a failed send is left to `resend_overdue`."""
    for task_id, request in zip(flat[::2], flat[1::2]):
        send(task_id.decode(), json.loads(request))
    return len(flat) // 2


def make_celery(settings: Settings | None = None) -> Celery:
    """The Celery app that API processes send with and workers consume with; tasks travel as json
    only. The worker imports `worker.tasks` itself (`include`), so no API process loads model code."""
    settings = settings or get_settings()
    # With REDIS_SENTINELS, kombu's Sentinel transport: it asks them for the primary on each connection.
    app = Celery("chat", broker=broker_url(settings), include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_slots,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(settings)
        | {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": RESTORE_SCAN_S,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return app


def send_generate(celery: Celery, request: dict, task_id: str, takeover: bool = False) -> None:
    """Send one generation to Celery; a `takeover` goes ahead of released tasks. Its arguments are
    the user's prompt, so the message says how Celery shows them in its logs (`argsrepr`): a
    placeholder, never the prompt, whatever gets logged (Celery prints a request with its
    arguments when it cannot cancel it after a connection loss)."""
    celery.send_task(
        GENERATE_TASK,
        args=[request],
        task_id=task_id,
        priority=TAKEOVER_PRIORITY if takeover else NEW_TASK_PRIORITY,
        argsrepr="[<request>]",
        kwargsrepr="{}",
    )


def sender(celery: Celery) -> Send:
    """`send` for `Lanes.release`: each released task to Celery at the new tasks' priority."""
    return lambda task_id, request: send_generate(celery, request, task_id)


"""How long a task whose worker dies waits before another worker goes on with it, at the default
lease settings: the takeover bound over `--kills` SIGKILLs (median and worst), beside a SIGTERM's
hand back, in one run.

Run: `python -m bench.takeover [--kills 10 --stops 3]`. Starts a redis-server, two workers (the
embedded model, fp32) and an API. Each round asks for a greedy answer and, once it has streamed
a few chunks and then waited a random part of a renewal period (so that the kill falls anywhere
between two renewals of the lease), SIGKILLs (or SIGTERMs) the worker running it, then times the
kill to the first chunk the next attempt writes into the task's stream. A new worker replaces the one killed
before the next round. Every answer must end as the uninterrupted one did; the goal is at most
15 s from a worker's death to another worker generating.
"""

import argparse
import os
import platform
import random
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

from bench.table import print_table
from core.protocol import TaskStatus, TaskView
from core.settings import Settings
from core.store import chunks_key
from devstack.processes import Stack, wait_until
from tests.helpers import poll_until, poll_until_finished, submit

BODY = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 128}


def two_workers_ready(client: httpx.Client) -> bool:
    return "2 ready" in client.get("/health").json()["workers"]["detail"]


def one_round(
    stack: Stack, client: httpx.Client, admin: redis.Redis, how: signal.Signals, delay_s: float
) -> tuple[float, str]:
    """Seconds from the signal to the next attempt's first chunk, and the answer's final text."""
    task_id = submit(client, **BODY)
    view = poll_until(client, task_id, lambda v: len(v.chunks) >= 3)
    time.sleep(delay_s)
    name = (view.worker or "").split("@")[0]
    process = stack.workers.pop(name)
    signalled = time.monotonic()
    process.send_signal(how)

    def next_attempt_wrote() -> bool:
        last = admin.xrevrange(chunks_key(task_id), count=1)
        return bool(last) and last[0][1].get(b"attempt") == b"2"

    wait_until(next_attempt_wrote, 120, f"attempt 2 of {task_id}", interval_s=0.01)
    took_s = time.monotonic() - signalled
    process.wait()
    final, _ = poll_until_finished(client, task_id)
    assert final.status == TaskStatus.succeeded and final.attempt == 2, final
    stack.start_worker(f"worker-{uuid.uuid4().hex[:6]}")
    wait_until(lambda: two_workers_ready(client), 300, "a new second worker", interval_s=0.5)
    return took_s, final.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--stops", type=int, default=3)
    options = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-takeover-")), dict(os.environ), QUANTIZATION="none")
    try:
        stack.start_redis()
        stack.start_worker("first")
        stack.start_worker("second")
        stack.start_api()
        stack.wait_healthy()
        client = httpx.Client(base_url=stack.url, timeout=30)
        admin = redis.Redis.from_url(stack.redis_url)
        wait_until(lambda: two_workers_ready(client), 300, "two workers", interval_s=0.5)
        reference: TaskView = poll_until_finished(client, submit(client, **BODY))[0]
        phases = random.Random(0)
        rounds = [signal.SIGKILL] * options.kills + [signal.SIGTERM] * options.stops
        results = [one_round(stack, client, admin, how, phases.uniform(0, Settings().lease_renew_s)) for how in rounds]
        kills, stops = results[: options.kills], results[options.kills :]
    finally:
        stack.down()
    same = sum(text == reference.text for _, text in kills + stops)
    settings = Settings()
    print_table(
        f"{platform.node()}: LEASE_S={settings.lease_s:g}, LEASE_RENEW_S={settings.lease_renew_s:g}, "
        f"{options.kills} SIGKILLs and {options.stops} SIGTERMs mid-answer",
        [
            ("SIGKILL to the next attempt's first chunk, median (s)", statistics.median(s for s, _ in kills)),
            ("SIGKILL to the next attempt's first chunk, worst (s)", max(s for s, _ in kills)),
            ("SIGTERM to the next attempt's first chunk, median (s)", statistics.median(s for s, _ in stops)),
            ("SIGTERM to the next attempt's first chunk, worst (s)", max(s for s, _ in stops)),
            ("answers equal to the uninterrupted one (of all rounds)", same / len(kills + stops)),
        ],
    )


if __name__ == "__main__":
    main()

"""Push through the API, measured: SSE fan-out latency at 500 streams, and time to first token seen.

Run: `python -m bench.sse [--streams 500 --rounds 20 --runs 5]`. Starts its own stacks.

- Fan-out: a redis-server and one API process, no worker: this script plays the worker, appending
  a chunk to each of `--streams` running tasks every second, spread evenly (through the task
  store, as a worker does), while as many clients hold `GET /task/{id}/events` open in one uvloop
  loop. Each chunk carries the time just before its append; the latency is from then to the
  client's parse of the event. The clients, the API and Redis share the machine's cores.
- First token: one worker (fp32) as well; each run submits a 16-token task and follows it by
  SSE, then another polled every 10 ms, alternately. "Above the engine" is the time from submit
  to the first chunk seen, minus the worker's own time to first token for that task.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import uvloop
from httpx_sse import aconnect_sse, connect_sse

from core.protocol import TaskView
from core.store import TaskStore
from bench.table import print_table
from devstack.processes import Stack, wait_until

PROMPT = "Write a very long story about a lighthouse keeper and a storm."
OPENING_AT_ONCE = 20
ROUND_S = 1.0  # each stream gets a chunk a second: 500 streams make 500 chunks a second in all


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def stack(with_worker: bool) -> Iterator[Stack]:
    logs = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    running = Stack(logs, dict(os.environ), QUANTIZATION="none", MAX_QUEUED_TASKS="100000")
    try:
        running.start_redis()
        running.start_api()
        if with_worker:
            running.start_worker()
            running.wait_healthy()
        else:
            wait_until(lambda: _answers(running.url), 120, "the API", interval_s=0.2)
        yield running
    finally:
        running.down()


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return True


# ---- fan-out ----------------------------------------------------------------------------------


async def hold(client: httpx.AsyncClient, task_id: str, expected: int, opening: asyncio.Semaphore,
               ready: asyncio.Event, latencies: list[float]) -> None:
    """One client: opens its stream (a few at a time, as clients arrive, not 500 in one instant
    against Redis's accept backlog), then times each chunk until it has `expected`."""
    async with opening:
        source_cm = aconnect_sse(client, "GET", f"/task/{task_id}/events")
        source = await source_cm.__aenter__()
    try:
        if source.response.status_code != 200:
            raise RuntimeError(f"HTTP {source.response.status_code}: {(await source.response.aread())[:300]!r}")
        ready.set()
        async for event in source.aiter_sse():
            if event.event != "chunk":
                return
            latencies.append(time.time() - float(json.loads(event.data)["text"]))
            expected -= 1
            if expected == 0:
                return
    finally:
        await source_cm.__aexit__(None, None, None)


def write_rounds(store: TaskStore, task_ids: list[str], rounds: int, round_s: float) -> None:
    """Each round gives every task one chunk, spread evenly over `round_s`, as many workers'
    chunks arrive: each task streams a chunk every `round_s`."""
    gap_s = round_s / len(task_ids)
    next_at = time.perf_counter()
    for number in range(rounds):
        for task_id in task_ids:
            store.append_chunk(task_id, 1, number, f"{time.time():.6f}", [1, 2, 3, 4])
            next_at += gap_s
            time.sleep(max(0.0, next_at - time.perf_counter()))


async def fan_out(url: str, redis_url: str, streams: int, rounds: int) -> list[float]:
    store = TaskStore(redis.Redis.from_url(redis_url), ttl_s=600)
    task_ids = [str(uuid.uuid4()) for _ in range(streams)]
    for task_id in task_ids:
        store.create(task_id)
        store.start(task_id, "bench", "{}")
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        readies = [asyncio.Event() for _ in task_ids]
        opening = asyncio.Semaphore(OPENING_AT_ONCE)
        holders = [asyncio.create_task(hold(client, t, rounds, opening, r, latencies))
                   for t, r in zip(task_ids, readies)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
        await asyncio.sleep(1)  # every stream is in its blocking read
        writer = threading.Thread(target=write_rounds, args=(store, task_ids, rounds, ROUND_S))
        writer.start()
        await asyncio.wait_for(asyncio.gather(*holders), 300)
        writer.join()
    return latencies


# ---- first token ------------------------------------------------------------------------------


def first_seen_by_sse(client: httpx.Client) -> tuple[float, float]:
    """(submit to first chunk seen, the worker's own time to first token)."""
    started = time.perf_counter()
    task_id = submit(client)
    first = None
    with connect_sse(client, "GET", f"/task/{task_id}/events") as source:
        for event in source.iter_sse():
            first = first or time.perf_counter() - started
            if event.event == "result":
                view = TaskView.model_validate(event.json())
                break
    return first or 0.0, engine_first(view)


def first_seen_by_polling(client: httpx.Client, interval_s: float = 0.01) -> tuple[float, float]:
    started = time.perf_counter()
    task_id = submit(client)
    first, cursor = None, "0-0"
    while True:
        view = TaskView.model_validate(client.get(f"/task/{task_id}", params={"after": cursor}).json())
        if view.chunks and first is None:
            first = time.perf_counter() - started
        cursor = view.cursor
        if view.status.finished:
            return first or 0.0, engine_first(view)
        time.sleep(interval_s)


def submit(client: httpx.Client) -> str:
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 16}
    return client.post("/generate", json=body).json()["task_id"]


def engine_first(view: TaskView) -> float:
    assert view.timings and view.timings.time_to_first_token_s is not None, view.error
    return view.timings.time_to_first_token_s


def first_token_rows(url: str, runs: int) -> list[tuple[str, float]]:
    with httpx.Client(base_url=url, timeout=120) as client:
        first_seen_by_sse(client)  # warm-up, left out
        pairs = [(first_seen_by_sse(client), first_seen_by_polling(client)) for _ in range(runs)]
    sse = [seen for (seen, _), _ in pairs]
    polled = [seen for _, (seen, _) in pairs]
    above = [seen - engine for (seen, engine), _ in pairs]
    engine = [engine for (_, engine), _ in pairs]
    return [
        ("first token: engine's own, in the worker (s)", statistics.median(engine)),
        ("first token: submit to first chunk seen by SSE (s)", statistics.median(sse)),
        ("first token: submit to first chunk seen polling every 10 ms (s)", statistics.median(polled)),
        ("first token: SSE above the engine's own (ms)", 1000 * statistics.median(above)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rows: list[tuple[str, float]] = []
    with stack(with_worker=False) as api_only:
        latencies = uvloop.run(fan_out(api_only.url, api_only.redis_url, args.streams, args.rounds))
    assert len(latencies) == args.streams * args.rounds, len(latencies)
    rows += [
        (f"fan-out: chunks delivered ({args.streams} streams x {args.rounds})", len(latencies)),
        ("fan-out: append to SSE client, p50 (ms)", 1000 * statistics.median(latencies)),
        ("fan-out: append to SSE client, p95 (ms)", 1000 * percentile(latencies, 0.95)),
    ]
    with stack(with_worker=True) as full:
        rows += first_token_rows(full.url, args.runs)
    print_table(f"machine: {platform.machine()}, {os.cpu_count()} cores; embedded model fp32, greedy; "
                f"first-token rows are medians of {args.runs} runs", rows)


if __name__ == "__main__":
    main()

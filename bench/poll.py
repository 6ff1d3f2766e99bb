"""What a poll costs as the answer grows: `GET /task/{id}?after=<latest cursor>` on finished tasks
of 1, 256 and 2,500 chunks, with and without the cursor, side by side in one run.

Run: `python -m bench.poll [--pollers 20 --seconds 3 --runs 3]`. Starts a redis-server and one
API process, no worker: this script writes each task through the task store as a worker does
(start, one chunk per append, finish), then `--pollers` threads poll one task as fast as they
can for `--seconds`. Medians over `--runs`. The goal: at the latest cursor, a 256-chunk answer's
poll costs at most 1.2x a 1-chunk answer's, and its body does not grow.
"""

import argparse
import os
import platform
import statistics
import threading
import time
import uuid

import httpx
import redis

from bench.sse import percentile, stack
from bench.table import print_table
from core.protocol import GenerationResult, MemoryStats, Timings, Usage
from core.store import TaskStore

CHUNK = "a few more words, "  # about what a worker flushes every 4 tokens
TOKENS = [264, 1151, 540, 2474]
SIZES = (1, 256, 2500)


def finished_task(store: TaskStore, chunks: int) -> tuple[str, str]:
    """A succeeded task of `chunks` chunks, and its latest cursor."""
    task_id = str(uuid.uuid4())
    store.create(task_id)
    attempt = store.start(task_id, "bench", "{}").attempt
    for number in range(chunks):
        store.append_chunk(task_id, attempt, number, CHUNK, TOKENS)
    result = GenerationResult(
        text=CHUNK * chunks, finish_reason="length", usage=Usage(prompt_tokens=10, completion_tokens=4 * chunks),
        timings=Timings(queued_s=0, time_to_first_token_s=0.1, generation_s=1, tokens_per_second=4 * chunks,
                        total_s=1),
        memory=MemoryStats(device="cpu", model_weight_bytes=1, peak_bytes=1), model="bench", worker="bench",
    )
    store.finish(task_id, attempt, result)
    view = store.view(task_id)
    assert view is not None
    return task_id, view.cursor


def hammer(url: str, path: str, params: dict[str, str], pollers: int, seconds: float) -> tuple[float, float, int]:
    """(polls per second, median latency in ms, body bytes) with `pollers` threads at once."""
    latencies: list[float] = []
    sizes: list[int] = []
    deadline = time.perf_counter() + seconds

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = client.get(path, params=params)
                latencies.append(time.perf_counter() - started)
                sizes.append(len(response.content))
                assert response.status_code == 200, response.text

    threads = [threading.Thread(target=poll) for _ in range(pollers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), percentile(latencies, 0.5) * 1000, max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    with stack(with_worker=False) as running:
        store = TaskStore(redis.Redis.from_url(running.redis_url), ttl_s=600)
        tasks = {size: finished_task(store, size) for size in SIZES}
        figures: dict[tuple[int, bool], list[tuple[float, float, int]]] = {}
        for _ in range(options.runs):  # interleaved, so that drift in the machine hits every case alike
            for size, (task_id, cursor) in tasks.items():
                for with_cursor in (True, False):
                    params = {"after": cursor} if with_cursor else {}
                    figures.setdefault((size, with_cursor), []).append(
                        hammer(running.url, f"/task/{task_id}", params, options.pollers, options.seconds)
                    )
    rows: list[tuple[str, float]] = []
    medians = {key: [statistics.median(run[i] for run in runs) for i in range(3)] for key, runs in figures.items()}
    for (size, with_cursor), (rate, p50_ms, body) in medians.items():
        how = "at the latest cursor" if with_cursor else "no cursor (whole text)"
        rows += [(f"{size} chunks, {how}: polls/s", rate), (f"{size} chunks, {how}: p50 ms", p50_ms),
                 (f"{size} chunks, {how}: body bytes", body)]
    for size in SIZES[1:]:
        rows.append((f"p50 at the latest cursor, {size} vs 1 chunk (goal <= 1.2)",
                     medians[(size, True)][1] / medians[(1, True)][1]))
    print_table(f"{platform.machine()}, {os.cpu_count()} cores, {options.pollers} pollers, "
                f"medians of {options.runs} runs of {options.seconds:g} s", rows)


if __name__ == "__main__":
    main()

"""What a queued task's place in line costs: `GET /task/{id}` on a task at the front and at the
back of a queue of 1,000, beside the same poll on a finished task (which computes no place),
side by side in one run.

Run: `python -m bench.queue_position [--queued 1000 --pollers 20 --seconds 3 --runs 3]`. Starts
a redis-server and one API process, no worker, so every task submitted stays queued; then
`--pollers` threads poll one task as fast as they can for `--seconds`. Medians over `--runs`.
"""

import argparse
import os
import platform
import statistics

import httpx
import redis

from bench.poll import finished_task, hammer
from bench.sse import stack
from bench.table import print_table
from core.store import TaskStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    with stack(with_worker=False) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            queued = [client.post("/generate", json={"prompt": "hi"}).json()["task_id"] for _ in range(options.queued)]
            assert client.get(f"/task/{queued[-1]}").json()["queue_position"] == options.queued - 1
        finished, _ = finished_task(TaskStore(redis.Redis.from_url(running.redis_url), ttl_s=600), 1)
        cases = {"finished task (no place computed)": finished, "queued, 1st of 1,000": queued[0],
                 "queued, 1,000th of 1,000": queued[-1]}
        figures: dict[str, list[tuple[float, float, int]]] = {}
        for _ in range(options.runs):  # interleaved, so that drift in the machine hits every case alike
            for label, task_id in cases.items():
                figures.setdefault(label, []).append(
                    hammer(running.url, f"/task/{task_id}", {}, options.pollers, options.seconds)
                )
    rows: list[tuple[str, float]] = []
    medians = {label: [statistics.median(run[i] for run in runs) for i in range(2)] for label, runs in figures.items()}
    for label, (rate, p50_ms) in medians.items():
        rows += [(f"{label}: polls/s", rate), (f"{label}: p50 ms", p50_ms)]
    base = medians["finished task (no place computed)"][1]
    rows.append(("p50, 1,000th queued vs finished", medians["queued, 1,000th of 1,000"][1] / base))
    print_table(f"{platform.machine()}, {os.cpu_count()} cores, {options.pollers} pollers, "
                f"medians of {options.runs} runs of {options.seconds:g} s", rows)


if __name__ == "__main__":
    main()

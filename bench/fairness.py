"""Fair shares under load: two keys at 10:1 offered load on one stack, each key's share of the
tokens generated and the light key's time to first token, against the light key running alone.

One redis-server, one worker of WORKER_CONCURRENCY=2 (llama.cpp, the default engine) and the API,
with `API_KEYS=heavy:…,light:…`. The heavy key keeps 10 streams busy (each sends its next task as
its last ends), the light key one; with fair shares each key gets half the slots while both have
work, so the light key's share of the tokens is 1/2 whatever the heavy key offers, and its first
token waits at most about one generation for a slot. `--seconds` per phase: alone, loaded, and
loaded with the light client sending under the heavy key (one lane, first come first served: the
queue as it was before lanes), side by side in one run.
"""

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.table import print_table
from devstack.processes import Stack

KEYS = {"heavy": "bench-heavy-key", "light": "bench-light-key"}
BODY = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}], "max_tokens": 64,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


def one_task(client: httpx.Client, model: str) -> tuple[float, int]:
    """Send one chat task as a stream; its time to first token (from sending) and its tokens."""
    sent = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=BODY | {"model": model}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - sent, tokens


def run_streams(url: str, key: str, streams: int, until: float, out: list[tuple[float, int]]) -> list[threading.Thread]:
    """`streams` clients of `key`, each sending its next task as soon as its last one ends."""

    def loop() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            while time.monotonic() < until:
                out.append(one_task(client, model))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    return threads


def phase(url: str, seconds: float, heavy_streams: int, light_key: str = KEYS["light"]) -> tuple[list, list]:
    """The heavy key's and the light one's (TTFT, tokens) per task, over `seconds`."""
    until = time.monotonic() + seconds
    heavy: list[tuple[float, int]] = []
    light: list[tuple[float, int]] = []
    threads = run_streams(url, KEYS["heavy"], heavy_streams, until, heavy)
    threads += run_streams(url, light_key, 1, until, light)
    for thread in threads:
        thread.join()
    return heavy, light


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    options = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-fairness-")), dict(os.environ),
                  API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()), WORKER_CONCURRENCY="2")
    try:
        stack.up()
        phase(stack.url, 5, 0)  # warm-up
        _, alone = phase(stack.url, options.seconds, 0)
        heavy, light = phase(stack.url, options.seconds, 10)
        # The light client sending with the heavy key: one lane, first come first served, as before lanes.
        fifo_heavy, fifo_light = phase(stack.url, options.seconds, 10, light_key=KEYS["heavy"])
    finally:
        stack.down()
    rows = [("light key alone: tasks", len(alone)),
            ("light key alone: tokens per task", statistics.mean(t for _, t in alone)),
            ("light key alone: TTFT p50 (s)", statistics.median(s for s, _ in alone)),
            ("light key alone: TTFT p95 (s)", p95([s for s, _ in alone]))]
    for label, (h, l) in [("fair lanes", (heavy, light)), ("one FIFO lane", (fifo_heavy, fifo_light))]:
        rows += [
            (f"{label}: light's share of the tokens (fair: 0.5 of 2 slots)", share(h, l)),
            (f"{label}: light's tasks / alone", len(l) / len(alone)),
            (f"{label}: light TTFT p50 (s)", statistics.median(s for s, _ in l)),
            (f"{label}: light TTFT p95 (s)", p95([s for s, _ in l])),
            (f"{label}: light TTFT p95 / alone", p95([s for s, _ in l]) / p95([s for s, _ in alone])),
        ]
    print_table(f"{os.uname().nodename}: 1 worker x 2 slots, {options.seconds:.0f} s per phase, "
                "10 heavy streams : 1 light", rows)


def share(heavy: list[tuple[float, int]], light: list[tuple[float, int]]) -> float:
    light_tokens = sum(t for _, t in light)
    return light_tokens / max(1, light_tokens + sum(t for _, t in heavy))


if __name__ == "__main__":
    main()

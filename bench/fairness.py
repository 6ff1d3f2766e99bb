"""Fair shares under load: two keys at 10:1 offered load on one stack, each key's share of the
tokens against its fair share, and the light key's time to first token against it running alone.

One redis-server, one worker of WORKER_CONCURRENCY=2 (llama.cpp, the default engine) and the API,
with `API_KEYS=heavy:…,light:…`; every task a chat stream of 64 tokens. The heavy key keeps 10
clients busy, each sending its next task as its last ends: it offers as much as the fleet can take.
The light key sends a task every `--every` seconds whatever happens (open loop), about a tenth of
what the fleet serves. A key's fair share (max-min) is what it offers, up to half the tokens
served; the heavy key's is the rest. Three phases of `--seconds` in one run: the light key alone,
both keys on their own lanes, and both in one lane (the light key's tasks sent under the heavy key:
first come first served, the queue as it was before lanes).
"""

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.table import print_table
from devstack.processes import Stack

KEYS = {"heavy": "bench-heavy-key", "light": "bench-light-key"}
TOKENS = 64
BODY = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
HEAVY_CLIENTS = 10


@dataclass
class Served:
    """One key's tasks in a phase: each one's time to first token and tokens."""

    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    offered: int = 0  # tasks sent
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one_task(self, url: str, key: str) -> None:
        with self.lock:
            self.offered += 1
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            sent = time.perf_counter()
            first, tokens = None, 0
            with client.stream("POST", "/v1/chat/completions", json=BODY | {"model": model(client)}) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - sent
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        with self.lock:
            self.ttft_s.append(first if first is not None else time.perf_counter() - sent)
            self.tokens += tokens


def model(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def phase(url: str, seconds: float, every_s: float, heavy_clients: int, light_key: str) -> tuple[Served, Served]:
    """The heavy key's closed loop and the light key's open loop for `seconds`; then every task
    sent is waited for, so each counts whole."""
    until = time.monotonic() + seconds
    heavy, light = Served(), Served()

    def heavy_loop() -> None:
        while time.monotonic() < until:
            heavy.one_task(url, KEYS["heavy"])

    threads = [threading.Thread(target=heavy_loop) for _ in range(heavy_clients)]
    for thread in threads:
        thread.start()
    next_at = time.monotonic()
    while next_at < until:
        thread = threading.Thread(target=light.one_task, args=(url, light_key))
        thread.start()
        threads.append(thread)
        next_at += every_s
        time.sleep(max(0.0, next_at - time.monotonic()))
    for thread in threads:
        thread.join()
    return heavy, light


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between the light key's tasks")
    options = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-fairness-")), dict(os.environ),
                  API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()), WORKER_CONCURRENCY="2")
    try:
        stack.up()
        phase(stack.url, 5, 1.0, 0, KEYS["light"])  # warm-up
        _, alone = phase(stack.url, options.seconds, options.every, 0, KEYS["light"])
        results = {
            "fair lanes": phase(stack.url, options.seconds, options.every, HEAVY_CLIENTS, KEYS["light"]),
            "one FIFO lane": phase(stack.url, options.seconds, options.every, HEAVY_CLIENTS, KEYS["heavy"]),
        }
    finally:
        stack.down()
    rows = [("light key alone: tasks", alone.offered),
            ("light key alone: TTFT p50 (s)", statistics.median(alone.ttft_s)),
            ("light key alone: TTFT p95 (s)", p95(alone.ttft_s))]
    for label, (heavy, light) in results.items():
        served = heavy.tokens + light.tokens
        light_fair = min(light.offered * TOKENS, served / 2)
        rows += [
            (f"{label}: tokens served, both keys", served),
            (f"{label}: light's share of them", light.tokens / served),
            (f"{label}: light's fair share", light_fair / served),
            (f"{label}: light's share / fair", light.tokens / light_fair),
            (f"{label}: heavy's share / fair", heavy.tokens / (served - light_fair)),
            (f"{label}: light TTFT p50 (s)", statistics.median(light.ttft_s)),
            (f"{label}: light TTFT p95 (s)", p95(light.ttft_s)),
            (f"{label}: light TTFT p95 / alone", p95(light.ttft_s) / p95(alone.ttft_s)),
        ]
    print_table(f"{os.uname().nodename}: 1 worker x 2 slots, {options.seconds:.0f} s per phase, {HEAVY_CLIENTS} heavy "
                f"clients in a closed loop, a light task every {options.every} s", rows)


if __name__ == "__main__":
    main()

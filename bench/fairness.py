"""Fair shares under load: two keys at 10:1 offered load on one stack, each key's share of the
tokens generated and the light key's time to first token, against the light key running alone.

One redis-server, one worker of WORKER_CONCURRENCY=2 (llama.cpp, the default engine) and the API,
with `API_KEYS=heavy:…,light:…`. The heavy key keeps 10 streams busy (each sends its next task as
its last ends), the light key one; with fair shares each key gets half the slots while both have
work, so the light key's share of the tokens is 1/2 whatever the heavy key offers, and its first
token waits at most about one generation for a slot. `--seconds` per phase: alone, then loaded.
"""

import argparse
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
BODY = {"prompt": "Tell me about lighthouses.", "max_new_tokens": 64}


def one_task(url: str, key: str) -> tuple[float, int]:
    """Send one task as a stream; its time to first token (from sending) and its tokens."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "any", "prompt": BODY["prompt"], "max_tokens": BODY["max_new_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    tokens = 0
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        models = client.get("/v1/models").json()["data"]
        body["model"] = models[0]["id"]
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None and '"text":"' in line and '"text":""' not in line:
                    first = time.perf_counter() - sent
                if '"usage":{' in line and '"completion_tokens"' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0])
    return first if first is not None else time.perf_counter() - sent, tokens


def run_streams(url: str, key: str, streams: int, until: float, out: list[tuple[float, int]]) -> list[threading.Thread]:
    def loop() -> None:
        while time.monotonic() < until:
            out.append(one_task(url, key))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    return threads


def phase(url: str, seconds: float, heavy_streams: int) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    until = time.monotonic() + seconds
    heavy: list[tuple[float, int]] = []
    light: list[tuple[float, int]] = []
    threads = run_streams(url, KEYS["heavy"], heavy_streams, until, heavy) if heavy_streams else []
    threads += run_streams(url, KEYS["light"], 1, until, light)
    for thread in threads:
        thread.join()
    return heavy, light


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    options = parser.parse_args()
    env = dict(os.environ)
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-fairness-")), env,
                  API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()), WORKER_CONCURRENCY="2")
    try:
        stack.up()
        phase(stack.url, 5, 0)  # warm-up
        _, alone = phase(stack.url, options.seconds, 0)
        heavy, light = phase(stack.url, options.seconds, 10)
    finally:
        stack.down()
    heavy_tokens, light_tokens = sum(t for _, t in heavy), sum(t for _, t in light)
    alone_ttft = [s for s, _ in alone]
    loaded_ttft = [s for s, _ in light]
    print_table(
        f"{os.uname().nodename}: 1 worker x 2 slots, {options.seconds:.0f} s per phase, 10 heavy streams : 1 light",
        [
            ("light key alone: tasks", len(alone)),
            ("light key alone: TTFT p50 (s)", statistics.median(alone_ttft)),
            ("light key alone: TTFT p95 (s)", p95(alone_ttft)),
            ("loaded: heavy key's tasks", len(heavy)),
            ("loaded: light key's tasks", len(light)),
            ("loaded: light key's share of the tokens", light_tokens / max(1, heavy_tokens + light_tokens)),
            ("loaded: light key's fair share (one stream, both keys wanting more than half)", 0.5),
            ("loaded: light key TTFT p50 (s)", statistics.median(loaded_ttft)),
            ("loaded: light key TTFT p95 (s)", p95(loaded_ttft)),
            ("light key TTFT p95, loaded / alone", p95(loaded_ttft) / p95(alone_ttft)),
        ],
    )


if __name__ == "__main__":
    main()

"""The engine and the whole stack, measured side by side in one run; prints a table of medians.

Starts its own stacks (a redis-server, a worker, the API on free ports) on the transformers engine
(`bench.engines` compares the engines): one worker at WORKER_CONCURRENCY=1 and one at 8.
Run: `python -m bench.stack [--runs 3 --quantization none]`.

Rows:
- plain `model.generate` and our engine publishing every chunk to Redis, same prompt and tokens,
  in this process, and their ratio;
- the per-token `generate(max_new_tokens=1)` loop without KV-cache reuse (the Jina streaming
  tutorial's approach) against our engine, at 256 tokens;
- through the stack: a task's tokens/s seen by a poller (first chunk to last), the worker's own
  figure, queue overhead (end to end minus the worker's generation time) p50 and p95, and
  submit to the first chunk a poller sees;
- aggregate tokens/s of 1, 2, 4 and 8 concurrent 64-token requests, on both workers, with the
  8-concurrent figure against the same 8 run one at a time.
"""

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import torch

from core.protocol import TaskStatus, TaskView
from core.settings import Settings
from core.store import TaskStore
from bench.table import print_table
from devstack.processes import Stack
from model_loader.contract import SamplingParams
from model_loader.factory import make_engine
from model_loader.loader import LoadedModel
from model_loader.sequential import SequentialEngine
from worker.interruptions import Interruptions

STORY = "Write a very long story about a lighthouse keeper and a storm."
FINE_POLL_S = 0.01  # one poller timing its first chunk
COARSE_POLL_S = 0.1  # many pollers at once: finer polling would take the worker's CPU on a small machine


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0)


def side_by_side(runs: int, first: Callable[[], float], second: Callable[[], float]) -> tuple[float, float]:
    """Medians of the two, run alternately, so a slow spell on a shared machine hits both alike."""
    pairs = [(first(), second()) for _ in range(runs)]
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def progress(rows: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Show each group of rows as it is measured: a full run takes many minutes."""
    for label, value in rows:
        print(f"  {label}: {value:.2f}", file=sys.stderr, flush=True)
    return rows


# ---- in this process ------------------------------------------------------------------------


def prompt_ids(loaded: LoadedModel) -> list[int]:
    messages = [{"role": "user", "content": STORY}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def plain_generate(loaded: LoadedModel, ids: list[int], tokens: int) -> float:
    batch = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                    max_new_tokens=tokens)
    return (out.shape[1] - len(ids)) / (time.perf_counter() - started)


def streamed_engine(engine: SequentialEngine, store: TaskStore, ids: list[int], tokens: int) -> float:
    """Our engine as a worker runs it: each chunk appended to a task's Redis stream, which also says
    whether the task was cancelled or taken over (read again when nothing was heard for a second);
    timed like plain generate, call to last chunk."""
    task_id = f"bench-{uuid.uuid4()}"
    store.create(task_id)
    attempt = store.start(task_id, "bench", "{}").attempt
    interruptions = Interruptions(store, task_id, attempt, float("inf"), threading.Event(), threading.Event())
    started = time.perf_counter()
    outcome = engine.generate(ids, greedy(tokens), on_chunk=interruptions.publish, interruption=interruptions)
    elapsed = time.perf_counter() - started
    store.delete(task_id)
    return outcome.completion_tokens / elapsed


def no_cache_loop(loaded: LoadedModel, ids: list[int], tokens: int) -> float:
    """One `generate(max_new_tokens=1)` per token on the whole sequence: the prompt is recomputed every time."""
    batch = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(tokens):
            batch = loaded.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                          max_new_tokens=1)
    return tokens / (time.perf_counter() - started)


def engine_rows(settings: Settings, redis_url: str, runs: int) -> list[tuple[str, float]]:
    engine = make_engine(settings)  # ENGINE=transformers at one slot: `generate` on the worker's engine
    assert isinstance(engine, SequentialEngine)
    loaded = engine.loaded
    store = TaskStore(redis.Redis.from_url(redis_url), ttl_s=600)
    ids = prompt_ids(loaded)
    plain_generate(loaded, ids, 8)  # warm-ups, left out
    streamed_engine(engine, store, ids, 8)
    plain, ours = side_by_side(
        runs, lambda: plain_generate(loaded, ids, 128), lambda: streamed_engine(engine, store, ids, 128)
    )
    loop, ours_256 = side_by_side(
        runs, lambda: no_cache_loop(loaded, ids, 256), lambda: streamed_engine(engine, store, ids, 256)
    )
    return [
        ("engine: plain generate, 128 tokens (tok/s)", plain),
        ("engine: ours streaming to Redis, 128 tokens (tok/s)", ours),
        ("  ratio streamed / plain", ours / plain),
        ("no-KV-cache generate(max_new_tokens=1) loop, 256 tokens (tok/s)", loop),
        ("ours, 256 tokens (tok/s)", ours_256),
        ("  ratio ours / no-cache loop", ours_256 / loop),
    ]


# ---- through the stack ------------------------------------------------------------------------


@contextmanager
def stack(quantization: str, concurrency: int) -> Iterator[Stack]:
    """A redis-server, one worker and the API, on free ports."""
    logs = Path(tempfile.mkdtemp(prefix=f"bench-c{concurrency}-"))
    running = Stack(
        logs, dict(os.environ), ENGINE="transformers", QUANTIZATION=quantization, WORKER_CONCURRENCY=str(concurrency)
    )
    try:
        yield running.up()
    finally:
        running.down()


def run_task(client: httpx.Client, tokens: int, poll_s: float = FINE_POLL_S) -> dict[str, float]:
    """Submit and poll to the end; when the first and last chunks were seen, and the result."""
    submitted = time.perf_counter()
    task_id = client.post("/generate", json={"prompt": STORY, "temperature": 0, "max_new_tokens": tokens}).json()[
        "task_id"
    ]
    cursor, first, last = "0-0", None, None
    while True:
        view = TaskView.model_validate(client.get(f"/task/{task_id}", params={"after": cursor}).json())
        now = time.perf_counter()
        if view.chunks:
            first = first or now
            last = now
        cursor = view.cursor
        if view.status.finished:
            break
        time.sleep(poll_s)
    assert view.status == TaskStatus.succeeded and view.timings and view.usage, view.error
    return {
        "tokens": view.usage.completion_tokens,
        "end_to_end": now - submitted,
        "first_chunk": (first or now) - submitted,
        "poller_tok_s": view.usage.completion_tokens / max((last or now) - (first or now), 1e-9),
        "worker_tok_s": view.timings.tokens_per_second,
        "generation": view.timings.generation_s,
    }


def task_rows(url: str, runs: int) -> list[tuple[str, float]]:
    with httpx.Client(base_url=url, timeout=60) as client:
        run_task(client, 8)  # warm-up, left out
        tasks = [run_task(client, 64) for _ in range(max(runs, 5))]
    overheads = sorted(t["end_to_end"] - t["generation"] for t in tasks)
    return [
        ("stack: task tok/s seen by a poller, first to last chunk", statistics.median(t["poller_tok_s"] for t in tasks)),
        ("stack: task tok/s reported by the worker", statistics.median(t["worker_tok_s"] for t in tasks)),
        ("stack: queue overhead p50 (s)", statistics.median(overheads)),
        ("stack: queue overhead p95 (s)", overheads[min(len(overheads) - 1, round(0.95 * (len(overheads) - 1)))]),
        ("stack: submit to first chunk seen (s)", statistics.median(t["first_chunk"] for t in tasks)),
    ]


def aggregate(url: str, concurrent: int, tokens: int = 64) -> float:
    """Tokens/s of `concurrent` requests submitted together, from the first submit to the last result."""
    results: list[dict[str, float]] = []

    def one() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            results.append(run_task(client, tokens, COARSE_POLL_S))

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


def one_at_a_time(url: str, count: int, tokens: int = 64) -> float:
    with httpx.Client(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        total = sum(run_task(client, tokens, COARSE_POLL_S)["tokens"] for _ in range(count))
    return total / (time.perf_counter() - started)


def concurrency_rows(url: str, label: str, runs: int) -> list[tuple[str, float]]:
    """Each run measures every row in turn, so the ratio compares figures taken minutes apart at most."""
    aggregate(url, 2, tokens=8)  # warm-up, left out
    levels = (1, 2, 4, 8)
    samples = [[aggregate(url, n) for n in levels] + [one_at_a_time(url, 8)] for _ in range(runs)]
    *concurrent, sequential = [statistics.median(column) for column in zip(*samples)]
    rows = [(f"{label}: aggregate tok/s, {n} concurrent x 64 tokens", value) for n, value in zip(levels, concurrent)]
    rows.append((f"{label}: the same 8 one at a time (tok/s)", sequential))
    rows.append((f"  ratio 8 concurrent / 8 one at a time ({label})", concurrent[-1] / sequential))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--parts", default="engine,tasks,concurrency", help="which groups of rows to measure")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `kill` still stops the stacks it started
    parts = set(args.parts.split(","))
    settings = Settings(engine="transformers", worker_concurrency=1, quantization=args.quantization)
    rows: list[tuple[str, float]] = []
    with stack(args.quantization, concurrency=1) as single:
        if "engine" in parts:
            rows += progress(engine_rows(settings, single.redis_url, args.runs))
        if "tasks" in parts:
            rows += progress(task_rows(single.url, args.runs))
        if "concurrency" in parts:
            rows += progress(concurrency_rows(single.url, "worker concurrency 1", args.runs))
    if "concurrency" in parts:
        with stack(args.quantization, concurrency=8) as batching:
            rows += progress(concurrency_rows(batching.url, "worker concurrency 8", args.runs))
    print_table(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, model "
                f"{settings.model_id} ({args.quantization}), greedy; medians of {args.runs} runs", rows)


if __name__ == "__main__":
    main()

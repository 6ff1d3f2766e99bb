"""A batch's throughput against the same requests sent live, and interactive TTFT while a batch runs.

Run: `python -m bench.batch [--engine llamacpp --slots 8 --lines 500 --tokens 32 --rounds 5 --probes 20]`.

One stack (redis-server, one worker of `slots`, the API), the official `openai` SDK as the client:
1. live: the `lines` chat requests sent at 8 concurrent, greedy, `tokens` each; tok/s is their
   completion tokens over the wall time;
2. batch: the same requests as one batch file, once the live ones are INTERACTIVE_ACTIVE_S behind
   (until then background work holds BACKGROUND_ACTIVE_SHARE of the slots); tok/s is the output's
   completion tokens over the time from `batches.create` to `completed` (validation and
   finalization included);
3. TTFT: `rounds` rounds of `probes` interactive streamed requests one after another, with nothing
   else running, then again while a batch of the same lines runs (once its first line has ended,
   so every probe meets it), which is then cancelled; p95 of the time to the first content chunk
   over all rounds. Alternating rounds, rather than all quiet probes and then all busy ones: this
   host's speed drifts by a third over minutes, which a single pair of phases would measure too.
The goals: batch ÷ live at least 0.9; TTFT p95 with a batch ÷ without at most 1.5.
"""

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from bench.engines import messages, our_stack, percentile
from core.settings import get_settings

START_TIMEOUT_S = 900
LIVE_CONCURRENCY = 8


def body(model: str, index: int, tokens: int) -> dict:
    return {"model": model, "messages": messages(index), "temperature": 0, "max_tokens": tokens}


def live(client: openai.OpenAI, model: str, lines: int, tokens: int) -> float:
    def one(index: int) -> int:
        answer = client.chat.completions.create(**body(model, index, tokens))
        return answer.usage.completion_tokens if answer.usage else 0

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=LIVE_CONCURRENCY) as pool:
        spent = sum(pool.map(one, range(lines)))
    return spent / (time.perf_counter() - started)


def upload(client: openai.OpenAI, model: str, lines: int, tokens: int) -> str:
    content = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body(model, i, tokens)}) for i in range(lines))
    return client.files.create(file=("bench.jsonl", content.encode()), purpose="batch").id


def start_batch(client: openai.OpenAI, file_id: str) -> str:
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id


def finished(client: openai.OpenAI, batch_id: str, poll_s: float = 0.2):
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(poll_s)
    return batch


def running(client: openai.OpenAI, batch_id: str, poll_s: float = 0.05) -> None:
    """Until the batch's first line has ended: its lines are flowing."""
    while not ((batch := client.batches.retrieve(batch_id)).request_counts and batch.request_counts.completed):
        assert batch.status in ("validating", "in_progress"), batch
        time.sleep(poll_s)


def batched(client: openai.OpenAI, file_id: str, lines: int) -> float:
    started = time.perf_counter()
    batch = finished(client, start_batch(client, file_id))
    elapsed = time.perf_counter() - started
    assert batch.status == "completed" and batch.output_file_id, batch
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(output) == lines
    return sum(entry["response"]["body"]["usage"]["completion_tokens"] for entry in output) / elapsed


def ttfts(client: openai.OpenAI, model: str, probes: int, first: int) -> list[float]:
    """Seconds to the first content chunk of `probes` streamed requests, one after another."""
    seen = []
    for i in range(probes):
        started = time.perf_counter()
        stream = client.chat.completions.create(**body(model, first + i, 16), stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(time.perf_counter() - started)
                break
        stream.close()
    return seen


def ttft_rounds(client: openai.OpenAI, model: str, file_id: str, rounds: int,
                probes: int) -> tuple[list[float], list[float]]:
    """TTFTs without a batch and beside one, `probes` of each per round; each round's batch is
    cancelled, and its running lines have ended, before the next round's quiet probes."""
    quiet: list[float] = []
    busy: list[float] = []
    for round_ in range(rounds):
        first = 10_000 + 2 * round_ * probes
        quiet += ttfts(client, model, probes, first)
        batch_id = start_batch(client, file_id)
        running(client, batch_id)
        busy += ttfts(client, model, probes, first + probes)
        client.batches.cancel(batch_id)
        assert finished(client, batch_id).status == "cancelled"
    return quiet, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=20, help="per round, with a batch and without")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    with our_stack(args.engine, args.slots, logs, START_TIMEOUT_S) as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        live(client, model, LIVE_CONCURRENCY, 4)  # warm-up, left out
        live_tps = live(client, model, args.lines, args.tokens)
        time.sleep(get_settings().interactive_active_s)
        file_id = upload(client, model, args.lines, args.tokens)
        batch_tps = batched(client, file_id, args.lines)
        quiet, busy = ttft_rounds(client, model, file_id, args.rounds, args.probes)
    quiet_p95, busy_p95 = percentile(quiet, 0.95), percentile(busy, 0.95)
    print(f"\n{args.lines} lines x {args.tokens} tokens, {args.engine} on {args.slots} slots, one run")
    print("| measure | without a batch | with a batch | ratio |\n|---|---|---|---|")
    print(f"| throughput, tok/s (live at {LIVE_CONCURRENCY} concurrent; the batch) | {live_tps:.1f} | {batch_tps:.1f} "
          f"| {batch_tps / live_tps:.2f} |")
    print(f"| interactive TTFT p95, ms ({len(quiet)} / {len(busy)} streams in {args.rounds} rounds; median "
          f"{statistics.median(quiet) * 1000:.0f} / {statistics.median(busy) * 1000:.0f}) | {quiet_p95 * 1000:.0f} "
          f"| {busy_p95 * 1000:.0f} | {busy_p95 / quiet_p95:.2f} |")


if __name__ == "__main__":
    main()

"""Decoding speed with a JSON schema ÷ without, through the whole queue, for each engine, in one run.

Run: `python -m bench.structured [--engines llamacpp,transformers:1,transformers:8,vllm --concurrency 1,8 --tokens 96
--runs 3]` (an engine's slots after a colon; 8 by default).

For each engine a Stack (redis-server, one worker, the API) is started alone; at each concurrency,
waves of N streams are sent through the official `openai` SDK, greedy, alternating a wave with
`response_format` (a schema whose free-text field must be longer than the token budget, so the
answer runs to the budget as the plain one does: an answer that ends early spends more of its
wave's time on the prompt, and its tok/s would say nothing of the grammar) and a wave without, on the same prompts. A wave's tok/s is its streams'
completion tokens over its wall time; the figure is the median over `runs` waves, and the ratio is
constrained ÷ plain (the goal: at least 0.85). transformers runs one slot (`generate`) and eight
(its continuous batching, each request's grammar on its own row).
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import tempfile

import openai

from bench.engines import messages, our_stack

SLOTS = 8
START_TIMEOUT_S = 900
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "story", "strict": True, "schema": {
        "type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string", "minLength": 1000}},
        "required": ["title", "story"], "additionalProperties": False,
    }},
}


def stream_tokens(client: openai.OpenAI, model: str, index: int, tokens: int, constrained: bool) -> int:
    """The completion tokens of one stream, which must have run to the budget."""
    extra = {"response_format": FORMAT} if constrained else {}
    stream = client.chat.completions.create(
        model=model, messages=messages(index), stream=True, temperature=0, max_tokens=tokens,
        stream_options={"include_usage": True}, **extra,
    )
    spent = sum(chunk.usage.completion_tokens for chunk in stream if chunk.usage is not None)
    assert spent == tokens, f"a stream ended after {spent} of {tokens} tokens"
    return spent


def wave(client: openai.OpenAI, model: str, concurrency: int, first: int, tokens: int, constrained: bool) -> float:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        started = time.perf_counter()
        counts = list(pool.map(lambda i: stream_tokens(client, model, first + i, tokens, constrained),
                               range(concurrency)))
        return sum(counts) / (time.perf_counter() - started)


def measure(spec: str, concurrencies: list[int], tokens: int, runs: int, logs: Path) -> dict[int, tuple[float, float]]:
    """Median tok/s (plain, constrained) at each concurrency, on `engine[:slots]`."""
    engine, _, slots = spec.partition(":")
    figures = {}
    with our_stack(engine, int(slots or SLOTS), logs, START_TIMEOUT_S) as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        for constrained in (False, True):  # warm-up, left out
            wave(client, model, 1, 0, 8, constrained)
        for concurrency in concurrencies:
            plain, constrained = [], []
            for run in range(runs):
                first = run * concurrency
                plain.append(wave(client, model, concurrency, first, tokens, False))
                constrained.append(wave(client, model, concurrency, first, tokens, True))
            figures[concurrency] = (statistics.median(plain), statistics.median(constrained))
            print(f"{spec:14} {concurrency:2} streams: plain {figures[concurrency][0]:6.1f} tok/s, with a schema "
                  f"{figures[concurrency][1]:6.1f} tok/s, ratio {figures[concurrency][1] / figures[concurrency][0]:.2f}",
                  flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="llamacpp,transformers:1,transformers:8,vllm")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    results = {e: measure(e, concurrencies, args.tokens, args.runs, logs) for e in args.engines.split(",")}
    print("\n| engine | streams | tok/s plain | tok/s with a schema | ratio |\n|---|---|---|---|---|")
    for engine, figures in results.items():
        for concurrency, (plain, constrained) in figures.items():
            print(f"| {engine} | {concurrency} | {plain:.1f} | {constrained:.1f} | {constrained / plain:.2f} |")


if __name__ == "__main__":
    main()

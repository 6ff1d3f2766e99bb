"""Engines side by side, in one run: ours through the whole queue against each engine's own server and
plain transformers `generate`, on the same model, the same prompts and the same token budget.

Run: `python -m bench.engines [--engines llamacpp,transformers --concurrency 1,8,32 --tokens 128 --runs 1]`
(`make bench`). Writes docs/engines.json and docs/engines.png; prints the figures, the ratios the
project's goals use and a Markdown table for the README.

Systems, each started alone so none competes with another for the cores:
- ours: a Stack (redis-server, one worker, the API) with ENGINE=<engine>; llamacpp and vllm run 8
  slots, transformers 1 slot (sequential `generate`) and/or 8 (continuous batching);
- each engine's own server on the same weights: llama.cpp's `llama-server` with the flags our
  worker starts it with, and `vllm serve` on the converted folder (only with vllm in --engines
  and its environment at VLLM_PYTHON);
- plain transformers fp32 `model.generate`, in a child process: one stream is one call per
  request, N streams one batched call over N left-padded prompts.

The servers are all streamed through the official `openai` SDK (greedy, `max_tokens`), each
stream's completion tokens read from the usage chunk (`stream_options.include_usage`), or
counted as content chunks where a server sends none (the JSON says which). TTFT is from the
request to its first content delta. A wave is N streams sent at once; its aggregate tok/s is
every stream's completion tokens over the wave's wall time. Peak memory is the summed RSS of the
serving processes (ours: the worker and its engine server child), sampled during each wave.
"""

import argparse
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import openai
import psutil

from bench.table import print_table
from core.settings import Settings
from devstack.processes import Stack, wait_healthy
from model_loader.engine_server import EngineServer
from model_loader.llamacpp import llama_server_command
from model_loader.source import model_dir
from model_loader.vllm import kv_cache_bytes, vllm_device

SYSTEM_PROMPT = "You are a helpful assistant."
# Distinct prompts that draw long answers, so greedy streams run to the token budget (mostly).
PROMPTS = [
    "Write a very long story about a lighthouse keeper and a storm.",
    "Tell me a long tale about a dragon who wanted to become a baker.",
    "Write a long adventure story about two children lost in a forest.",
    "Tell a long story about a robot learning to paint.",
    "Write a detailed story about a sailor who finds a map to a hidden island.",
    "Tell me a long bedtime story about a cat who travels to the moon.",
    "Write a long story about a small village preparing for a winter festival.",
    "Tell a long story about an old clockmaker and his last clock.",
]
WARM_UP_PROMPT = "Say hello and introduce yourself."  # not one of PROMPTS, so no timed prompt is cached by it
RSS_SAMPLE_S = 0.1
OWN_SERVER = {"ours-llamacpp": "llama-server", "ours-vllm": "vllm-serve"}  # ours -> the same engine's own server
DEFAULT_ENGINE = "ours-llamacpp"
PLAIN = "plain-generate"
ROOT = Path(__file__).resolve().parent.parent


# ---- what a wave measures --------------------------------------------------------------------


@dataclass
class Stream:
    ttft_s: float | None  # None when no content came at all
    tokens: int
    counted_by: str  # "usage", "chunks" (content deltas; a server without usage) or "generate"


@dataclass
class Wave:
    """N streams sent at once, timed from the first send to the last stream's end."""

    wall_s: float
    streams: list[Stream]
    peak_rss_bytes: int | None


@dataclass
class Summary:
    """One system at one concurrency: medians over the runs; TTFTs pooled over every run's streams."""

    concurrency: int
    tok_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    peak_rss_mb: float | None
    mean_tokens: float  # completion tokens per stream: below --tokens where greedy answers met EOS
    counted_by: str


@dataclass
class SystemResult:
    key: str
    label: str
    summaries: list[Summary] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server and the processes whose memory counts as its own."""

    base_url: str  # ends in /v1
    processes: Callable[[], list[psutil.Process]]


@dataclass(frozen=True)
class System:
    key: str
    label: str
    serve: Callable[[], AbstractContextManager[Endpoint]]


def messages(index: int) -> list[dict[str, str]]:
    """Request `index` of a system's run: the same for every system. Every system gets the same explicit
    system prompt (so none adds its own default), and the request's number makes each prompt new to
    the servers' prompt caches, as real traffic would be, while the shared prefix stays shared."""
    story = f"{PROMPTS[index % len(PROMPTS)]} (Request {index}.)"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": story}]


def wave_starts(concurrencies: list[int], runs: int) -> list[tuple[int, int]]:
    """(concurrency, index of its first request) of each wave, in the order every system runs them."""
    starts, sent = [], 0
    for concurrency in concurrencies:
        for _ in range(runs):
            starts.append((concurrency, sent))
            sent += concurrency
    return starts


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with one sample, that sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(concurrency: int, waves: list[Wave]) -> Summary:
    streams = [s for w in waves for s in w.streams]
    ttfts = [s.ttft_s * 1000 for s in streams if s.ttft_s is not None]
    peaks = [w.peak_rss_bytes for w in waves if w.peak_rss_bytes is not None]
    return Summary(
        concurrency=concurrency,
        tok_s=statistics.median(sum(s.tokens for s in w.streams) / w.wall_s for w in waves),
        ttft_p50_ms=percentile(ttfts, 0.5) if ttfts else None,
        ttft_p95_ms=percentile(ttfts, 0.95) if ttfts else None,
        peak_rss_mb=max(peaks) / 1e6 if peaks else None,
        mean_tokens=statistics.mean(s.tokens for s in streams),
        counted_by="/".join(sorted({s.counted_by for s in streams})),
    )


def progress(label: str, summary: Summary) -> None:
    """A full run takes many minutes: show each figure as it is taken."""
    print(f"  {label}, {summary.concurrency} streams: {summary.tok_s:.1f} tok/s, "
          f"TTFT p50 {summary.ttft_p50_ms or 0:.0f} ms, "
          f"{summary.mean_tokens:.0f} tokens/stream", file=sys.stderr, flush=True)


# ---- memory ------------------------------------------------------------------------------------


def tree(root: psutil.Process) -> list[psutil.Process]:
    """A server and every process under it (an engine server child, vLLM's engine core)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def summed_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss:
    """Samples the serving processes' summed RSS on a thread while a wave runs: psutil reads only
    current RSS, and a child's peak (`ru_maxrss`) cannot be read from outside it."""

    def __init__(self, processes: Callable[[], list[psutil.Process]]) -> None:
        self._processes = processes
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self.peak = 0

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, summed_rss(self._processes()))
            if self._done.wait(RSS_SAMPLE_S):
                return


# ---- streaming through the openai SDK ----------------------------------------------------------


def stream_one(client: openai.OpenAI, model: str, chat: list[dict[str, str]], tokens: int) -> Stream:
    started = time.perf_counter()
    first, usage, chunks = None, None, 0
    stream = client.chat.completions.create(
        model=model, messages=chat, stream=True, temperature=0, max_tokens=tokens,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            chunks += 1
    ttft = first - started if first is not None else None
    if usage is None:
        return Stream(ttft, chunks, "chunks")
    return Stream(ttft, usage, "usage")


def http_wave(client: openai.OpenAI, model: str, endpoint: Endpoint, concurrency: int, first: int, tokens: int) -> Wave:
    """`concurrency` streams sent at once from threads, requests `first` onwards."""
    with PeakRss(endpoint.processes) as rss, ThreadPoolExecutor(max_workers=concurrency) as pool:
        started = time.perf_counter()
        futures = [pool.submit(stream_one, client, model, messages(first + i), tokens) for i in range(concurrency)]
        streams = [f.result() for f in futures]
        wall = time.perf_counter() - started
    return Wave(wall, streams, rss.peak)


def measure_http(system: System, concurrencies: list[int], tokens: int, runs: int) -> SystemResult:
    result = SystemResult(system.key, system.label)
    with system.serve() as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        stream_one(client, model, [{"role": "user", "content": WARM_UP_PROMPT}], 8)  # warm-up, left out
        waves = [(c, http_wave(client, model, endpoint, c, first, tokens))
                 for c, first in wave_starts(concurrencies, runs)]
    return summarized(result, concurrencies, waves)


def summarized(result: SystemResult, concurrencies: list[int], waves: list[tuple[int, Wave]]) -> SystemResult:
    for concurrency in concurrencies:
        result.summaries.append(summarize(concurrency, [wave for c, wave in waves if c == concurrency]))
        progress(result.label, result.summaries[-1])
    return result


# ---- the systems -------------------------------------------------------------------------------


@contextmanager
def our_stack(engine: str, slots: int, logs: Path, start_timeout_s: float) -> Iterator[Endpoint]:
    """Redis, one worker and the API on free ports; waits longer than Stack.up for engines that compile."""
    stack = Stack(logs / f"ours-{engine}-{slots}", dict(os.environ), ENGINE=engine, WORKER_CONCURRENCY=str(slots))
    try:
        stack.start_redis()
        stack.start_worker()
        stack.start_api()
        assert stack.api is not None
        wait_healthy(stack.url, {"api": stack.api, **stack.workers}, stack.logs, timeout_s=start_timeout_s)
        worker = psutil.Process(stack.workers["worker"].pid)
        yield Endpoint(stack.url + "/v1", lambda: tree(worker))
    finally:
        stack.down()


@contextmanager
def own_server(name: str, command: Callable[[int], list[str]], start_timeout_s: float,
               env: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """An engine's own server as a child of this process (gone with it, like the worker's), on a free port."""
    server = EngineServer(name, command, "/health", start_timeout_s, env=env)
    try:
        server.start()
        assert server.pid is not None
        process = psutil.Process(server.pid)
        yield Endpoint(server.url + "/v1", lambda: tree(process))
    finally:
        server.stop()


def vllm_command(settings: Settings, slots: int) -> Callable[[int], list[str]]:
    """`vllm serve` on the converted folder, with the KV cache our worker gives it (vLLM's default, a share
    of all memory, does not fit beside the rest here); fp32 on the CPU unless VLLM_ARGS names a dtype."""
    folder = model_dir(settings)
    extra = shlex.split(settings.vllm_args)
    dtype = [] if "--dtype" in extra else ["--dtype", "float32"]
    kv_bytes = kv_cache_bytes(settings, folder, vllm_device(settings))

    def command(port: int) -> list[str]:
        return [
            str(settings.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(slots),
            "--kv-cache-memory-bytes", str(kv_bytes), *dtype, *extra,
        ]

    return command


def vllm_env(settings: Settings) -> dict[str, str]:
    """Left alone, vLLM's CPU backend drops torch to one thread."""
    return dict(os.environ) | {"OMP_NUM_THREADS": str(settings.engine_threads or os.cpu_count() or 1)}


def systems(engines: list[str], transformers_slots: list[int], settings: Settings, logs: Path) -> list[System]:
    """What runs, in order; vLLM only where its environment is installed (`make vllm`)."""
    timeout = float(settings.engine_start_timeout_s) + 120  # an engine server's start, plus loading the worker
    chosen: list[System] = []
    for engine in engines:
        if engine == "llamacpp":
            chosen.append(System("ours-llamacpp", "ours: llamacpp, 8 slots",
                                 lambda: our_stack("llamacpp", 8, logs, timeout)))
            chosen.append(System("llama-server", "llama.cpp llama-server, 8 slots",
                                 lambda: own_server("bench-llama-server", partial(llama_server_command, settings, 8), timeout)))
        elif engine == "transformers":
            for slots in transformers_slots:
                how = "1 slot, sequential" if slots == 1 else f"{slots} slots, batching"
                chosen.append(System(f"ours-transformers-{slots}", f"ours: transformers, {how}",
                                     lambda slots=slots: our_stack("transformers", slots, logs, timeout)))
        elif engine == "vllm":
            if not settings.vllm_python.is_file():
                print(f"skipping vllm: no vLLM environment at {settings.vllm_python} (`make vllm`)", file=sys.stderr)
                continue
            chosen.append(System("ours-vllm", "ours: vllm, 8 slots", lambda: our_stack("vllm", 8, logs, timeout)))
            chosen.append(System("vllm-serve", "vllm serve, 8 seqs",
                                 lambda: own_server("bench-vllm", vllm_command(settings, 8), timeout,
                                                    vllm_env(settings))))
        else:
            raise SystemExit(f"unknown engine {engine!r}: llamacpp, transformers or vllm")
    return chosen


# ---- plain transformers generate, in a child process --------------------------------------------


def plain_waves(concurrencies: list[int], tokens: int, runs: int) -> list[tuple[int, Wave]]:
    """Runs in a spawned child, so its peak RSS (`ru_maxrss`) is the model's and `generate`'s alone.

    One stream: one `generate` call a request. N streams: one batched call over N prompts, padded
    on the left. TTFT is the first new token's time, taken by a stopping criterion (called after
    every decoding step); a stream's tokens are its new tokens before the first end-of-sequence.
    """
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

    class FirstToken(StoppingCriteria):
        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            self.at = self.at or time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    folder = model_dir(Settings())
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    def generate(first: int, count: int, new_tokens: int) -> Wave:
        texts = [tokenizer.apply_chat_template(messages(first + i), add_generation_prompt=True, tokenize=False)
                 for i in range(count)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        criterion = FirstToken()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, stopping_criteria=[criterion],
                                 pad_token_id=tokenizer.pad_token_id)
        wall = time.perf_counter() - started
        ttft = (criterion.at or time.perf_counter()) - started
        answers = out[:, batch.input_ids.shape[1]:]
        streams = [Stream(ttft, _until_eos(row.tolist(), eos_ids), "generate") for row in answers]
        return Wave(wall, streams, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    generate(-1, 1, 8)  # warm-up, left out
    return [(c, generate(first, c, tokens)) for c, first in wave_starts(concurrencies, runs)]


def _until_eos(ids: list[int], eos_ids: set[int]) -> int:
    return next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))


def measure_plain(concurrencies: list[int], tokens: int, runs: int) -> SystemResult:
    result = SystemResult(PLAIN, "plain transformers fp32 generate (N streams: one batched call)")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as child:
        waves = child.submit(plain_waves, concurrencies, tokens, runs).result()
    return summarized(result, concurrencies, waves)


# ---- the report ----------------------------------------------------------------------------------


def at(result: SystemResult | None, concurrency: int) -> Summary | None:
    if result is None:
        return None
    return next((s for s in result.summaries if s.concurrency == concurrency), None)


def ratios(results: dict[str, SystemResult], concurrencies: list[int]) -> list[tuple[str, float]]:
    """The goals' comparisons: ours against the same engine's own server, and the default engine
    against plain transformers fp32 `generate` at 1 and 8 streams."""
    rows: list[tuple[str, float]] = []
    for ours_key, own_key in OWN_SERVER.items():
        for c in concurrencies:
            ours, own = at(results.get(ours_key), c), at(results.get(own_key), c)
            if ours and own:
                rows.append((f"{ours_key} / {own_key}: aggregate tok/s, {c} streams", ours.tok_s / own.tok_s))
                if ours.ttft_p50_ms is not None and own.ttft_p50_ms is not None:
                    difference = ours.ttft_p50_ms - own.ttft_p50_ms
                    rows.append((f"{ours_key} - {own_key}: TTFT p50 (ms), {c} streams", difference))
    for c in (1, 8):
        ours, plain = at(results.get(DEFAULT_ENGINE), c), at(results.get(PLAIN), c)
        if ours and plain:
            rows.append((f"{DEFAULT_ENGINE} / {PLAIN}: aggregate tok/s, {c} streams", ours.tok_s / plain.tok_s))
    return rows


def figure_rows(results: dict[str, SystemResult]) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    for result in results.values():
        for s in result.summaries:
            name = f"{result.key}, {s.concurrency} streams"
            rows.append((f"{name}: aggregate tok/s", s.tok_s))
            rows += [(f"{name}: TTFT p50 (ms)", s.ttft_p50_ms)] if s.ttft_p50_ms is not None else []
            rows += [(f"{name}: TTFT p95 (ms)", s.ttft_p95_ms)] if s.ttft_p95_ms is not None else []
            rows += [(f"{name}: peak RSS (MB)", s.peak_rss_mb)] if s.peak_rss_mb is not None else []
    return rows


def print_markdown(results: dict[str, SystemResult]) -> None:
    """One row per system and concurrency, for the README."""
    print("\n| system | streams | aggregate tok/s | TTFT p50 (ms) | TTFT p95 (ms) | peak RSS (MB) | tokens/stream "
          "| counted by |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")

    def number(value: float | None, digits: int = 0) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    for result in results.values():
        for s in result.summaries:
            print(f"| {result.label} | {s.concurrency} | {s.tok_s:.1f} | {number(s.ttft_p50_ms)} "
                  f"| {number(s.ttft_p95_ms)} "
                  f"| {number(s.peak_rss_mb)} | {s.mean_tokens:.0f} | {s.counted_by} |")


def draw(results: dict[str, SystemResult], concurrencies: list[int], title: str, path: Path) -> None:
    """Two panels, one line per system: aggregate tok/s and TTFT p50 against concurrent streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure, (speed, ttft) = plt.subplots(1, 2, figsize=(12, 5))
    for result in results.values():
        xs = [s.concurrency for s in result.summaries]
        speed.plot(xs, [s.tok_s for s in result.summaries], marker="o", label=result.label)
        ttft.plot(xs, [s.ttft_p50_ms or float("nan") for s in result.summaries], marker="o", label=result.label)
    for axis, ylabel in ((speed, "aggregate tokens/s"), (ttft, "TTFT p50 (ms, log scale)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    ttft.set_yscale("log")
    ttft.yaxis.set_major_formatter(ScalarFormatter())
    ttft.yaxis.set_minor_formatter(NullFormatter())
    speed.set_ylim(bottom=0)
    speed.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="llamacpp,transformers",
                        help="ours and each engine's own server: llamacpp,transformers,vllm")
    parser.add_argument("--transformers-slots", default="1,8",
                        help="ENGINE=transformers workers: 1 sequential, more batching")
    parser.add_argument("--concurrency", default="1,8,32", help="concurrent streams per wave")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each stream (greedy)")
    parser.add_argument("--runs", type=int, default=1, help="waves per system and concurrency (medians)")
    parser.add_argument("--no-plain", action="store_true", help="leave out plain transformers generate")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "engines.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "engines.png")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `kill` still stops the servers it started
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    settings = Settings()
    logs = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    print(f"logs: {logs}", file=sys.stderr)

    results: dict[str, SystemResult] = {}
    slots = [int(s) for s in args.transformers_slots.split(",")]
    for system in systems(args.engines.split(","), slots, settings, logs):
        print(f"{system.label}:", file=sys.stderr, flush=True)
        try:
            results[system.key] = measure_http(system, concurrencies, args.tokens, args.runs)
        except Exception as exc:  # one system failing to start should not lose the others' figures
            print(f"  {system.label} failed: {exc!r} (logs: {logs})", file=sys.stderr)
            results[system.key] = SystemResult(system.key, system.label, error=repr(exc))
    if not args.no_plain:
        print("plain transformers generate:", file=sys.stderr, flush=True)
        results[PLAIN] = measure_plain(concurrencies, args.tokens, args.runs)

    measured = {key: r for key, r in results.items() if r.summaries}
    if not measured:
        raise SystemExit("nothing was measured")
    title = f"{machine()}; {settings.model_id} model, greedy, {args.tokens} new tokens, {args.runs} run(s)"
    ratio_rows = ratios(measured, concurrencies)
    print_table(title, figure_rows(measured) + ratio_rows)
    print_markdown(measured)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "tokens": args.tokens, "runs": args.runs, "concurrency": concurrencies,
        "systems": {key: asdict(r) for key, r in results.items()}, "ratios": dict(ratio_rows),
    }, indent=2) + "\n")
    draw(measured, concurrencies, title, args.chart)
    print(f"\nwrote {args.out} and {args.chart}", file=sys.stderr)
    if any(r.error for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

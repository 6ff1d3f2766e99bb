"""The transformers engines on a GPU at the production target's size: a Llama-2-7B-shaped model in NF4.

For an H100/H200 with no network: no weights can be downloaded, and speed and memory depend on
the shapes, not on what the weights learned. So this builds a `LlamaForCausalLM` with
Llama-2-7B's sizes and random weights on the GPU, saves it as fp16 safetensors to a temporary
folder with a self-made word-level tokenizer of the same vocabulary (prompts are random token
ids), and loads it the way a worker does (`model_loader.loader.load_model`: NF4, double
quantization, bf16 compute on CUDA). Then it measures the project's engines in this process:
`SequentialEngine` at 1 stream, `BatchingEngine` at each --concurrency (generations sent at once
from threads). The end-of-sequence row of the output layer is zeroed, so greedy answers always
run to --tokens and every configuration decodes the same number of tokens.

Figures per engine and concurrency: aggregate tok/s (all completion tokens over the wave's wall
time, the device synchronised before each clock read), TTFT p50/p95 (the engine's own, from the
call to the first token), and peak VRAM (`torch.cuda.max_memory_allocated` during the wave).
With --vllm-python, also `vllm serve --quantization bitsandbytes` on the same folder, streamed
over HTTP (`/v1/completions` with token-id prompts); its memory is the device's in use, since vLLM
reserves a share of the card up front.

Run on the GPU machine: `python -m bench.gpu --out gpu.json` (about 13.5 GB of disk for the
folder, removed at the end). Here, on the CPU: `python -m bench.gpu --tiny --out /tmp/gpu.json`
(a tiny config, same code path; the figures mean nothing).
"""

import argparse
import json
import math
import platform
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.table import print_table
from core.settings import Settings
from model_loader.batching import BatchingEngine
from model_loader.contract import Engine, FlushPolicy, SamplingParams
from model_loader.loader import LoadedModel, load_model
from model_loader.sequential import SequentialEngine
from prompts import context_window

# Llama-2-7B's shapes (meta-llama/Llama-2-7b-hf config.json), and a tiny one for a CPU dry run.
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=1024)
UNK, BOS, EOS = 0, 1, 2  # Llama-2's special ids
FLUSH = FlushPolicy(every_tokens=1, every_s=0.0)  # a chunk per token: the engines' TTFT is their first token


@dataclass
class Summary:
    system: str
    concurrency: int
    tok_s: float  # median over runs
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    peak_vram_gb: float | None
    mean_tokens: float


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with one sample, that sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(system: str, concurrency: int, waves: list[tuple[float, list[tuple[float | None, int]], float | None]]
              ) -> Summary:
    """`waves`: (wall seconds, [(TTFT seconds, completion tokens) per generation], peak bytes)."""
    ttfts = [t * 1000 for _, streams, _ in waves for t, _ in streams if t is not None]
    peaks = [peak for _, _, peak in waves if peak is not None]
    return Summary(
        system=system,
        concurrency=concurrency,
        tok_s=statistics.median(sum(n for _, n in streams) / wall for wall, streams, _ in waves),
        ttft_p50_ms=percentile(ttfts, 0.5) if ttfts else None,
        ttft_p95_ms=percentile(ttfts, 0.95) if ttfts else None,
        peak_vram_gb=max(peaks) / 1e9 if peaks else None,
        mean_tokens=statistics.mean(n for _, streams, _ in waves for _, n in streams),
    )


def progress(summary: Summary) -> None:
    vram = "" if summary.peak_vram_gb is None else f", peak VRAM {summary.peak_vram_gb:.2f} GB"
    print(f"  {summary.system}, {summary.concurrency} concurrent: {summary.tok_s:.1f} tok/s, "
          f"TTFT p50 {summary.ttft_p50_ms or 0:.0f} ms{vram}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Honest clocks: the GPU's queued work finishes before the time is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the model: Llama-2-7B's shapes, random weights ----------------------------------------------


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per id, so any id decodes: the engines stream text, and no tokenizer can be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS} | {f"<t{i}>": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def save_random_model(shapes: dict[str, int], folder: Path, device: torch.device) -> float:
    """Build on the device (seconds on a GPU; 7B fp32 is 27 GB there before halving), save fp16 safetensors.

    The end-of-sequence row of the output layer is zeroed: its logit is 0 while the largest of
    the others is well above 0, so greedy never ends an answer early.
    """
    started = time.perf_counter()
    config = LlamaConfig(**shapes, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=UNK, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).half()
    with torch.no_grad():
        model.lm_head.weight[EOS].zero_()
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(folder)
    word_tokenizer(shapes["vocab_size"]).save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (no special ids), the same for every engine at a given wave."""
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, vocab_size) for _ in range(length - 1)] for _ in range(count)]


# ---- our engines, in this process ----------------------------------------------------------------


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0)


def engine_wave(engine: Engine, device: torch.device, batch: list[list[int]], tokens: int
                ) -> tuple[float, list[tuple[float | None, int]], float | None]:
    """Every prompt of the batch at once, from its own thread, as a worker's slots call the engine."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        outcomes = list(pool.map(lambda ids: engine.generate(ids, greedy(tokens), lambda *_: None), batch))
    synchronize(device)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return wall, [(o.time_to_first_token_s, o.completion_tokens) for o in outcomes], peak


def measure_engine(name: str, engine: Engine, device: torch.device, concurrencies: list[int], args: argparse.Namespace,
                   vocab_size: int) -> list[Summary]:
    engine_wave(engine, device, prompts(1, args.prompt_tokens, vocab_size, seed=-1), 8)  # warm-up, left out
    summaries = []
    for concurrency in concurrencies:
        batches = [prompts(concurrency, args.prompt_tokens, vocab_size, seed=run) for run in range(args.runs)]
        waves = [engine_wave(engine, device, batch, args.tokens) for batch in batches]
        summaries.append(summarize(name, concurrency, waves))
        progress(summaries[-1])
    return summaries


def settings_for(folder: Path, device: torch.device, slots: int) -> Settings:
    """What a worker with WORKER_CONCURRENCY=slots would read, pointed at the saved folder; no .env."""
    return Settings(_env_file=None, engine="transformers", model_id=str(folder), quantization="nf4",
                    device=device.type, worker_concurrency=slots)


def measure_ours(folder: Path, device: torch.device, args: argparse.Namespace, vocab_size: int
                 ) -> tuple[LoadedModel, list[Summary]]:
    """One load, both engines on it: the sequential one first, before batching sets up its cache."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    settings = settings_for(folder, device, max(concurrencies))
    loaded = load_model(settings)
    context = settings.usable_context(context_window(folder, settings.context_window))
    summaries = measure_engine("ours: SequentialEngine (generate)", SequentialEngine(loaded, FLUSH, context), device,
                               [1], args, vocab_size)
    batching = BatchingEngine(loaded, FLUSH, settings, context)
    try:
        summaries += measure_engine("ours: BatchingEngine (continuous batching)", batching, device, concurrencies,
                                    args, vocab_size)
    finally:
        batching.close()
    return loaded, summaries


# ---- vLLM's own server on the same folder ---------------------------------------------------------


def vllm_stream(url: str, model: str, ids: list[int], tokens: int) -> tuple[float | None, int]:
    """One streamed completion on a token-id prompt: (TTFT s, completion tokens from the usage chunk)."""
    import httpx

    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, first, completion = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                first = first or time.perf_counter()
            if event.get("usage"):
                completion = event["usage"]["completion_tokens"]
    return (first - started if first else None), completion


def device_used_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


@contextmanager
def vllm_server(python: Path, folder: Path, slots: int, extra: str) -> Iterator[str]:
    """`vllm serve` on the folder as a child that dies with this process; yields its URL."""
    from model_loader.engine_server import EngineServer

    def command(port: int) -> list[str]:
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
                "--port", str(port), "--quantization", "bitsandbytes", "--max-num-seqs", str(slots),
                *shlex.split(extra)]

    server = EngineServer("bench-gpu-vllm", command, "/health", start_timeout_s=1200)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def measure_vllm(folder: Path, device: torch.device, args: argparse.Namespace, vocab_size: int) -> list[Summary]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    name = "vllm serve --quantization bitsandbytes (device memory in use)"
    summaries = []
    with vllm_server(args.vllm_python, folder, max(concurrencies), args.vllm_args) as url:
        vllm_stream(url, str(folder), prompts(1, args.prompt_tokens, vocab_size, seed=-1)[0], 8)  # warm-up
        for concurrency in concurrencies:
            waves = []
            for run in range(args.runs):
                batch = prompts(concurrency, args.prompt_tokens, vocab_size, seed=run)
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    streams = list(pool.map(lambda ids: vllm_stream(url, str(folder), ids, args.tokens), batch))
                waves.append((time.perf_counter() - started, streams, device_used_bytes(device)))
            summaries.append(summarize(name, concurrency, waves))
            progress(summaries[-1])
    return summaries


# ---- report ----------------------------------------------------------------------------------------


def rows(summaries: list[Summary]) -> list[tuple[str, float]]:
    table: list[tuple[str, float]] = []
    for s in summaries:
        name = f"{s.system}, {s.concurrency} concurrent"
        table.append((f"{name}: aggregate tok/s", s.tok_s))
        table += [(f"{name}: TTFT p50 (ms)", s.ttft_p50_ms)] if s.ttft_p50_ms is not None else []
        table += [(f"{name}: TTFT p95 (ms)", s.ttft_p95_ms)] if s.ttft_p95_ms is not None else []
        table += [(f"{name}: peak VRAM (GB)", s.peak_vram_gb)] if s.peak_vram_gb is not None else []
        table.append((f"{name}: tokens per generation", s.mean_tokens))
    return table


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"no GPU ({platform.machine()} CPU)"
    return f"{gpu}, torch {torch.__version__}"


def run(args: argparse.Namespace, folder: Path, report: Callable[[dict[str, object]], None]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else LLAMA2_7B
    print(f"building a random {'tiny' if args.tiny else 'Llama-2-7B-shaped'} model in {folder}", file=sys.stderr)
    save_s = save_random_model(shapes, folder, device)
    folder_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    loaded, summaries = measure_ours(folder, device, args, shapes["vocab_size"])
    load_s, weight_bytes = loaded.load_s, loaded.weight_bytes
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engines' memory goes back before vLLM takes its share of the card
    if args.vllm_python:
        summaries += measure_vllm(folder, device, args, shapes["vocab_size"])
    report({
        "machine": machine(device), "shapes": shapes, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
        "runs": args.runs, "build_and_save_s": save_s, "fp16_folder_bytes": folder_bytes, "nf4_load_s": load_s,
        "nf4_weight_bytes": weight_bytes, "results": [asdict(s) for s in summaries],
    })
    print_table(f"{machine(device)}; {'tiny config' if args.tiny else 'Llama-2-7B shapes'}, random weights, NF4, "
                f"greedy, {args.prompt_tokens}-token prompts, {args.tokens} new tokens, {args.runs} run(s); "
                f"fp16 folder {folder_bytes / 1e9:.2f} GB, NF4 weights {weight_bytes / 1e9:.2f} GB, "
                f"loaded in {load_s:.1f} s", rows(summaries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the figures as JSON")
    parser.add_argument("--tiny", action="store_true", help="a tiny LlamaConfig, for a dry run on the CPU")
    parser.add_argument("--concurrency", default="1,8,32", help="BatchingEngine's concurrent generations")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation (greedy)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="waves per engine and concurrency (medians)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary model folder goes (13.5 GB at 7B)")
    parser.add_argument("--vllm-python", type=Path, help="the Python of a vLLM environment: also measure `vllm serve`")
    parser.add_argument("--vllm-args", default="",
                        help="extra `vllm serve` arguments, e.g. '--gpu-memory-utilization 0.5'")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the folder and any vLLM server still go
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the 7B shapes need a GPU; use --tiny for a dry run on the CPU")

    def report(figures: dict[str, object]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.workdir) as folder:
        run(args, Path(folder), report)


if __name__ == "__main__":
    main()

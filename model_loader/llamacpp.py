"""Generation in llama.cpp's own `llama-server`, a child process this worker starts and supervises.

llama-server batches every slot's decoding step into one pass (continuous batching over
`--parallel` slots sharing one unified KV cache), so a worker with N slots runs N tasks in
one server. Each task streams `/completion` with its prompt as token ids (prompt plus the
published tokens when it goes on with an answer) and `return_tokens`, so every chunk carries
the ids it came from; the ids go through the same `TokenSink` as on every engine, which owns
stop strings, hold-back and interruptions. Leaving the stream closes the connection, which
cancels the request in the server at its next step and frees the slot.

Sampling is set to mean what it means on the other engines: the sampler chain is penalties,
top-k, top-p, temperature (llama.cpp's default min-p of 0.05 is off), the repetition penalty
looks back over the whole sequence as transformers' does, and temperature 0 is greedy.
"""

import json
import logging
import os
import shlex
from pathlib import Path
from typing import NoReturn

import httpx
from httpx_sse import EventSource
from tokenizers import Tokenizer

from core.settings import Settings
from model_loader.contract import (
    Capabilities,
    EngineMemory,
    EngineRestarted,
    FlushPolicy,
    SamplingParams,
    TokenLogprob,
)
from model_loader.engine_server import EngineServer
from model_loader.served import ServedEngine
from model_loader.sink import TokenSink
from model_loader.source import gguf_path, model_name, tokenizer_dir
from model_loader.token_bytes import HeldTokens
from prompts import context_window
from prompts.tokens import eos_token_ids

log = logging.getLogger(__name__)

SAMPLERS = ["penalties", "top_k", "top_p", "temperature"]
SEED_MODULUS = 2**32  # llama.cpp's seeds are 32-bit; ours go up to 2**63 - 1


def llama_server_binary(settings: Settings) -> Path:
    binary = settings.llama_server_bin
    if not binary.is_file():
        raise RuntimeError(
            f"ENGINE=llamacpp needs llama.cpp's llama-server at {binary}: build it once with `make llama-server` "
            "(several minutes), point LLAMA_SERVER_BIN at one, or set ENGINE=transformers"
        )
    return binary


def llama_server_command(settings: Settings, slots: int, port: int) -> list[str]:
    """How a worker starts its llama-server (and `bench/engines.py` the same server on its own).

    The worker, the API and Redis share the cores with it, so its threads sleep between steps
    (`--poll 0`) rather than spin: a spinning thread preempted mid-step stalls the others (8
    streams here: about 125 tok/s spinning, 155 to 170 not). A higher priority (`--prio`) gained
    a little more, but then a first token now and then waited 0.9 s.
    """
    threads = settings.engine_threads or os.cpu_count() or 1
    return [
        str(llama_server_binary(settings)), "--model", str(gguf_path(settings)), "--host", "127.0.0.1",
        "--port", str(port), "--parallel", str(slots), "--kv-unified", "--ctx-size", str(settings.kv_cache_tokens),
        "--threads", str(threads), "--threads-batch", str(threads), "--poll", "0", "--no-webui", "--log-disable",
        *shlex.split(settings.llama_server_args),
    ]


class LlamaCppEngine(ServedEngine):
    def __init__(self, settings: Settings, flush: FlushPolicy) -> None:
        folder = tokenizer_dir(settings)
        self.name = model_name(settings)
        self.flush = flush
        self._gguf = gguf_path(settings)
        llama_server_binary(settings)  # before anything starts: say what is missing and how to make it
        self._settings = settings
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._eos_ids = eos_token_ids(folder, self._tokenizer)
        self._held = HeldTokens(self._tokenizer)
        context = settings.usable_context(context_window(folder, settings.context_window))
        self.capabilities = Capabilities(
            engine="llamacpp", slots=settings.worker_slots, context_tokens=context, seed=True, repetition_penalty=True,
            grammar=True, logprobs=True, penalties=True,
        )
        self.server = EngineServer(
            "llama-server", self._command, "/health", settings.engine_start_timeout_s, port=settings.engine_port
        )
        self.server.start()
        self._client = httpx.Client(base_url=self.server.url, timeout=httpx.Timeout(None, connect=5))

    def _command(self, port: int) -> list[str]:
        return llama_server_command(self._settings, self._settings.worker_slots, port)

    def _stream(
        self, prompt: list[int], answer: list[int], params: SamplingParams, max_new_tokens: int, sink: TokenSink
    ) -> None:
        """Feed each streamed token to the sink until the server ends the answer or the sink says stop."""
        if self.server.restart_if_dead():
            log.warning("llama-server had died between tasks; started afresh")
        body = _body(prompt + answer, params, max_new_tokens)
        if params.constrained and answer:
            body |= _grammar_goes_on(self._decode(answer), params)
        try:
            with self._client.stream("POST", self.server.url + "/completion", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"llama-server refused the request: {response.read().decode(errors='replace')}")
                seen = 0
                for sse in EventSource(response).iter_sse():  # see served.py: lines end at CR or LF only
                    event = json.loads(sse.data)
                    if "error" in event:
                        raise RuntimeError(f"llama-server: {event['error']}")
                    tokens = self._with_held_tokens(event, seen)
                    seen += len(tokens)
                    scores = _logprobs(tokens, event, params.logprobs)
                    for token, logprob in zip(tokens, scores):
                        if sink.add(token, logprob):
                            return  # closing the stream cancels the request in the server
                    if event.get("stop"):
                        self._learn_eos(event, sink)
                        return
        except httpx.TransportError as exc:
            if not self.server.gone():
                raise
            self._restarted(str(exc))

    def _with_held_tokens(self, event: dict, seen: int) -> list[int]:
        """The event's tokens, preceded by those llama-server held back inside a UTF-8 character and
        left out of `tokens` (model_loader/token_bytes.py): without them the text would be wrong and
        a takeover would go on from the wrong ids. An answer cut inside a character leaves its last
        bytes unsent, and their tokens with them.

        Bytes that never become a character (a model writing invalid UTF-8) reach the event as
        U+FFFD, and no tokens' bytes fit it: then the event's text, encoded again, stands in for
        its tokens, so that the answer reads as the server sent it rather than failing."""
        tokens = list(event.get("tokens") or ())
        held = event.get("tokens_predicted", seen + len(tokens)) - seen - len(tokens)
        if held <= 0 or not tokens:
            return tokens
        text = event.get("content", "").encode()
        last = b"".join(self._held.bytes_of[token] for token in tokens)
        recovered = self._held.recover(text[: len(text) - len(last)], held) if text.endswith(last) else None
        if recovered is None:
            log.warning("llama-server left %d token(s) of %r unnamed and no tokens fit; its text encoded again "
                        "stands in for them", held, event.get("content"))
            return self._tokenizer.encode(event.get("content", ""), add_special_tokens=False).ids
        return recovered + tokens

    def _learn_eos(self, event: dict, sink: TokenSink) -> None:
        """The vocabulary's end-of-generation tokens are llama.cpp's to know (a GGUF may mark more than the
        tokenizer files say): the one that ended an answer counts as end of sequence from then on."""
        if event.get("stop_type") == "eos" and sink.last_token is not None and sink.last_token not in self._eos_ids:
            self._eos_ids.append(sink.last_token)

    def _restarted(self, why: str) -> NoReturn:
        self.server.restart_if_dead()  # EngineBroken if it cannot start again
        self._client = httpx.Client(base_url=self.server.url, timeout=httpx.Timeout(None, connect=5))
        raise EngineRestarted(f"llama-server died under this task ({why}) and was restarted")

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _memory(self) -> EngineMemory:
        """The GGUF is mapped as it is, so the weights are its size; the server's RSS is current, not
        peak (the weights, the whole KV cache it reserved at start and its buffers)."""
        rss = self.server.rss_bytes() or 0
        return EngineMemory(
            device="cpu" if "-ngl" not in self._settings.llama_server_args else "cuda",
            weight_bytes=self._gguf.stat().st_size,
            peak_bytes=rss,
            process_rss_bytes=rss,
            kv_cache_tokens=self._settings.kv_cache_tokens,
        )


def _body(ids: list[int], params: SamplingParams, max_new_tokens: int) -> dict[str, object]:
    body: dict[str, object] = {
        "prompt": ids,
        "n_predict": max_new_tokens,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
        "samplers": SAMPLERS,
        "min_p": 0.0,
        "repeat_penalty": params.repetition_penalty,
        "repeat_last_n": len(ids) + max_new_tokens,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }
    if params.logit_bias:
        body["logit_bias"] = [[token_id, bias] for token_id, bias in params.logit_bias]
    if params.temperature == 0:
        body |= {"temperature": 0.0, "top_k": 1}
    else:
        body |= {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    if params.seed is not None:
        body["seed"] = params.seed % SEED_MODULUS
    if params.logprobs is not None:  # the chosen token's comes with the alternatives, so at least one of those
        body |= {"n_probs": max(params.logprobs, 1), "post_sampling_probs": False}
    if params.json_schema is not None:
        body["json_schema"] = json.loads(params.json_schema)
    elif params.grammar is not None:
        body["grammar"] = params.grammar
    return body


def _logprobs(tokens: list[int], event: dict, top: int | None) -> list[TokenLogprob | None]:
    """Each token's log probabilities from the event's `completion_probabilities` (llama-server's, from the
    model's logits before sampling), matched by id; None for a token it gave none for."""
    if top is None:
        return [None] * len(tokens)
    given = iter(event.get("completion_probabilities") or ())
    found: list[TokenLogprob | None] = []
    for token in tokens:
        entry = next((e for e in given if e["id"] == token), None)
        found.append(None if entry is None else TokenLogprob(
            entry["logprob"], [(alt["id"], alt["logprob"]) for alt in entry["top_logprobs"][:top]]
        ))
    return found


def _grammar_goes_on(text: str, params: SamplingParams) -> dict[str, object]:
    """A grammar takes up an answer begun by another attempt from that answer's text: llama-server feeds
    its `generation_prompt` to the grammar before sampling (as it does for text its chat templates put
    after the prompt). It does so only for grammars it made itself, from a schema or for tool calls, so
    a GBNF grammar goes as a tool-call grammar, which changes nothing else on `/completion`."""
    return {"generation_prompt": text} | ({"grammar_type": "tool_calls"} if params.grammar is not None else {})

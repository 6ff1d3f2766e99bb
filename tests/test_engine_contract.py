"""The engine contract, held by every engine on the real embedded model: the same tests, each engine.

llama.cpp (its llama-server child, two slots), transformers one at a time, transformers'
continuous batching (two slots) and vLLM (its server child, two slots). Each test says what a worker relies on: the chunks and their
token ids add up to the answer, stop strings, cancel freeing the slot, seeds, going on from
published tokens, handing back, and surviving the engine's death.
"""

import json
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from tokenizers import Tokenizer

from core.protocol import HANDED_BACK, GenerateRequest
from core.settings import Settings
from model_loader.contract import Engine, EngineRestarted, Resume, SamplingParams, TokenLogprob
from model_loader.factory import make_engine
from prompts import build_prompt, load_formatter
from tests.conftest import MODEL_CACHE

ENGINES = {
    "llamacpp": {"ENGINE": "llamacpp", "WORKER_CONCURRENCY": "2", "KV_CACHE_TOKENS": "4096"},
    "transformers": {"ENGINE": "transformers", "WORKER_CONCURRENCY": "1"},
    "transformers-batching": {"ENGINE": "transformers", "WORKER_CONCURRENCY": "2", "KV_CACHE_TOKENS": "2048"},
    # vLLM's CPU backend, in its own environment (`make vllm`); eager, since compiling takes minutes.
    "vllm": {"ENGINE": "vllm", "WORKER_CONCURRENCY": "2", "KV_CACHE_TOKENS": "4096", "VLLM_ARGS": "--enforce-eager"},
}
STORY = "Write a long story about a lighthouse keeper."
JAPANESE = "How do you write 'Tokyo' in Japanese characters?"


def greedy(tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0, stop=stop)


def settings_for(name: str) -> Settings:
    fields = {key.lower(): value for key, value in ENGINES[name].items()}
    return Settings(_env_file=None, model_cache_dir=MODEL_CACHE, quantization="none", **fields)


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Engine]:
    settings = settings_for(request.param)
    running = make_engine(settings)
    assert running.capabilities.slots == settings.worker_slots
    yield running
    running.close()


def prompt(engine: Engine, text: str, tokenizer_dir: Path) -> list[int]:
    formatter = load_formatter(tokenizer_dir, "auto", engine.name)
    return build_prompt(formatter, GenerateRequest(prompt=text), "You are a helpful assistant.", 2048).input_ids


class Recorder:
    """What a worker's on_chunk would publish: each chunk's text and token ids."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.chunk_ids: list[list[int]] = []
        self.logprobs: list[TokenLogprob] = []

    def __call__(self, text: str, ids: list[int], logprobs: list[TokenLogprob]) -> None:
        self.texts.append(text)
        self.chunk_ids.append(list(ids))
        self.logprobs += logprobs

    @property
    def ids(self) -> list[int]:
        return [token for ids in self.chunk_ids for token in ids]

    def first(self, count: int) -> Resume:
        """What another attempt reads back once `count` chunks were published."""
        return Resume([token for ids in self.chunk_ids[:count] for token in ids], "".join(self.texts[:count]))


def test_chunks_and_their_token_ids_add_up_to_the_answer(engine: Engine, tokenizer_dir: Path) -> None:
    chunks = Recorder()
    outcome = engine.generate(prompt(engine, JAPANESE, tokenizer_dir), greedy(32), chunks)
    assert len(chunks.texts) > 1 and "".join(chunks.texts) == outcome.text
    assert any(ord(c) > 127 for c in outcome.text) and "\ufffd" not in outcome.text, outcome.text
    assert len(chunks.ids) == outcome.completion_tokens
    assert Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).decode(chunks.ids) == outcome.text
    assert outcome.prompt_tokens > 0 and outcome.finish_reason in ("eos", "length")
    assert outcome.memory.weight_bytes > 0 and outcome.memory.peak_bytes > 0


def test_line_separators_in_the_answer_reach_it_whole(engine: Engine, tokenizer_dir: Path) -> None:
    """U+2028 travels unescaped in a server's JSON; a reader that ends lines at it (httpx's
    `iter_lines`) cut events in two. A raw prompt of it, which this model goes on repeating."""
    ids = build_prompt(load_formatter(tokenizer_dir, "auto", engine.name),
                       GenerateRequest(prompt="Line\u2028" * 30, raw=True), "", 2048).input_ids
    chunks = Recorder()
    outcome = engine.generate(ids, greedy(16), chunks)
    assert "\u2028" in outcome.text and "".join(chunks.texts) == outcome.text, repr(outcome.text)


def test_an_answer_of_bytes_that_are_not_utf8_ends_as_the_text_streamed(engine: Engine, tokenizer_dir: Path) -> None:
    """Prompted with U+0085, this model writes bytes that never become a character: llama-server
    names no tokens for them, and the answer still ends, read as the server sent it."""
    ids = build_prompt(load_formatter(tokenizer_dir, "auto", engine.name),
                       GenerateRequest(prompt="Line\x85" * 30, raw=True), "", 2048).input_ids
    chunks = Recorder()
    outcome = engine.generate(ids, greedy(16), chunks)
    assert outcome.text and "".join(chunks.texts) == outcome.text, repr(outcome.text)
    assert Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).decode(chunks.ids) == outcome.text


def test_a_stop_string_across_chunks_ends_the_answer_before_it(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    whole = engine.generate(ids, greedy(48), Recorder())
    words = whole.text.split()
    stop = " ".join(words[8:10])  # two words: more than one token, and so across chunks of one token
    chunks = Recorder()
    cut = engine.generate(ids, greedy(48, stop=(stop,)), chunks)
    assert cut.finish_reason == "stop" and cut.stop_string == stop
    assert cut.text == whole.text[: whole.text.index(stop)] == "".join(chunks.texts)
    assert cut.completion_tokens < whole.completion_tokens


def test_going_on_from_published_tokens_ends_as_the_uninterrupted_answer(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    chunks = Recorder()
    whole = engine.generate(ids, greedy(64), chunks)
    assert len(chunks.texts) > 3
    for published in (1, len(chunks.texts) // 2, len(chunks.texts) - 1):
        rest = Recorder()
        resumed = engine.generate(ids, greedy(64), rest, resume=chunks.first(published))
        assert resumed.text == whole.text and resumed.completion_tokens == whole.completion_tokens
        assert chunks.first(published).text + "".join(rest.texts) == whole.text


def test_the_same_seed_gives_the_same_answer(engine: Engine, tokenizer_dir: Path) -> None:
    if not engine.capabilities.seed:
        assert engine.capabilities.engine == "transformers" and engine.capabilities.slots > 1
        return  # the heartbeat says so, and the API refuses a seed (tests/test_app_inprocess.py)
    ids = prompt(engine, STORY, tokenizer_dir)

    def sample(seed: int) -> str:
        params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed)
        return engine.generate(ids, params, Recorder()).text

    first = sample(1)
    assert sample(1) == first and sample(2) != first


PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer"},
        "owner": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
            "additionalProperties": False,
        },
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "nickname": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "kind", "age", "owner", "toys"],
    "additionalProperties": False,
}


def constrained(tokens: int, temperature: float = 0, seed: int | None = None, **constraint: str) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=tokens, temperature=temperature, top_p=1, top_k=0, repetition_penalty=1.0, seed=seed,
        **constraint,
    )


def test_a_constrained_answer_follows_its_schema_and_goes_on_after_a_takeover(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, "Describe a pet as JSON.", tokenizer_dir)
    params = constrained(200, json_schema=json.dumps(PET))
    chunks = Recorder()
    whole = engine.generate(ids, params, chunks)
    assert whole.finish_reason == "eos", whole.text
    jsonschema.validate(json.loads(whole.text), PET)
    for published in (1, len(chunks.texts) // 2, len(chunks.texts) - 1):
        rest = Recorder()
        resumed = engine.generate(ids, params, rest, resume=chunks.first(published))
        assert resumed.text == whole.text and resumed.finish_reason == "eos"


def test_a_sampled_constrained_answer_follows_its_schema_across_a_takeover(engine: Engine, tokenizer_dir: Path) -> None:
    """At temperature 1 the model wanders; the grammar keeps it inside the schema, before and after another
    attempt takes the answer up (with the seed every constrained task carries)."""
    ids = prompt(engine, "Describe a pet as JSON.", tokenizer_dir)
    params = constrained(300, temperature=1.0, seed=7, json_schema=json.dumps(PET))
    chunks = Recorder()
    whole = engine.generate(ids, params, chunks)
    assert whole.finish_reason == "eos", whole.text
    jsonschema.validate(json.loads(whole.text), PET)
    resumed = engine.generate(ids, params, Recorder(), resume=chunks.first(len(chunks.texts) // 2))
    assert resumed.finish_reason == "eos"
    jsonschema.validate(json.loads(resumed.text), PET)


def test_a_gbnf_grammar_constrains_the_answer(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, "Is the sky green?", tokenizer_dir)
    answer = engine.generate(ids, constrained(16, grammar='root ::= ("yes" | "no") ", " [a-z]{1,8} "."'), Recorder())
    assert answer.finish_reason == "eos" and re.fullmatch(r"(yes|no), [a-z]{1,8}\.", answer.text), answer.text


def test_a_grammar_cut_short_by_the_token_limit_ends_at_length(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, "Describe a pet as JSON.", tokenizer_dir)
    answer = engine.generate(ids, constrained(5, json_schema=json.dumps(PET)), Recorder())
    assert answer.finish_reason == "length" and answer.completion_tokens == 5 and answer.text.startswith("{")


def test_each_token_carries_its_log_probability_and_alternatives(engine: Engine, tokenizer_dir: Path) -> None:
    """Greedy, each token is the likeliest: its log probability is the first alternative's. A takeover's
    continuation carries its own tokens' (the published ones keep theirs in Redis)."""
    ids = prompt(engine, "What is the capital of France?", tokenizer_dir)
    params = SamplingParams(max_new_tokens=16, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0, logprobs=3)
    chunks = Recorder()
    whole = engine.generate(ids, params, chunks)
    assert len(chunks.logprobs) == whole.completion_tokens == len(chunks.ids)
    for token, scored in zip(chunks.ids, chunks.logprobs):
        assert scored is not None and len(scored.top) == 3
        (best, best_logprob), *others = scored.top
        assert best == token and math.isclose(scored.logprob, best_logprob, abs_tol=1e-3), (token, scored)
        assert all(logprob <= best_logprob + 1e-6 for _, logprob in others) and best_logprob <= 0
        assert sum(math.exp(logprob) for _, logprob in scored.top) <= 1 + 1e-3
    rest = Recorder()
    engine.generate(ids, params, rest, resume=chunks.first(len(chunks.texts) // 2))
    assert len(rest.logprobs) == len(rest.ids) > 0
    assert [lp.top[0][0] for lp in rest.logprobs] == rest.ids
    plain = Recorder()
    engine.generate(ids, greedy(4), plain)
    assert plain.logprobs == [], "none unless asked for"


def test_logit_bias_and_penalties_steer_the_answer(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)

    def run(tokens: int, **options: object) -> Recorder:
        chunks = Recorder()
        params = SamplingParams(max_new_tokens=tokens, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0,
                                **options)  # type: ignore[arg-type]
        engine.generate(ids, params, chunks)
        return chunks

    plain = run(48)
    wanted = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(" Zebra").ids[0]
    assert run(2, logit_bias=((wanted, 100.0),)).ids[0] == wanted
    assert run(2, logit_bias=((plain.ids[0], -100.0),)).ids[0] != plain.ids[0]
    penalized = run(48, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized.ids != plain.ids
    assert len(set(penalized.ids)) > len(set(plain.ids)), "penalties make the answer repeat itself less"


def test_a_repetition_penalty_makes_the_answer_repeat_itself_less(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    plain, penalized = Recorder(), Recorder()
    engine.generate(ids, greedy(64), plain)
    engine.generate(ids, SamplingParams(max_new_tokens=64, temperature=0, top_p=1, top_k=0, repetition_penalty=1.5),
                    penalized)
    assert penalized.ids != plain.ids

    def distinct(ids: list[int]) -> float:
        return len(set(ids)) / len(ids)

    assert distinct(penalized.ids) > distinct(plain.ids), ("".join(plain.texts), "".join(penalized.texts))


def test_answers_at_once_each_keep_their_own_grammar_and_options(engine: Engine, tokenizer_dir: Path) -> None:
    """Batched in the same steps: each answer's grammar, log probabilities and bias stay its own."""
    yes_no = constrained(16, grammar='root ::= ("yes" | "no") ", " [a-z]{1,8} "."')
    pet = constrained(200, json_schema=json.dumps(PET))
    scored = SamplingParams(max_new_tokens=16, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0, logprobs=2)
    jobs = {
        "yes_no": (prompt(engine, "Is the sky green?", tokenizer_dir), yes_no),
        "pet": (prompt(engine, "Describe a pet as JSON.", tokenizer_dir), pet),
        "scored": (prompt(engine, STORY, tokenizer_dir), scored),
        "plain": (prompt(engine, STORY, tokenizer_dir), greedy(16)),
    }
    recorders = {name: Recorder() for name in jobs}
    outcomes: dict[str, object] = {}

    def run(name: str) -> None:
        ids, params = jobs[name]
        outcomes[name] = engine.generate(ids, params, recorders[name])

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(outcomes) == set(jobs)
    assert re.fullmatch(r"(yes|no), [a-z]{1,8}\.", outcomes["yes_no"].text), outcomes["yes_no"].text  # type: ignore[attr-defined]
    jsonschema.validate(json.loads(outcomes["pet"].text), PET)  # type: ignore[attr-defined]
    assert len(recorders["scored"].logprobs) == len(recorders["scored"].ids) == 16
    assert [lp.top[0][0] for lp in recorders["scored"].logprobs] == recorders["scored"].ids
    # (Not the same tokens as "scored": batched beside different neighbours, llama.cpp's greedy answers may differ.)
    assert recorders["plain"].logprobs == [] and len(recorders["plain"].ids) == 16


def test_cancel_stops_at_the_next_token_and_frees_the_slot(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    chunks = Recorder()
    cancel = threading.Event()

    def on_chunk(text: str, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        chunks(text, token_ids, logprobs)
        cancel.set()

    outcome = engine.generate(ids, greedy(400), on_chunk, interruption=lambda: "cancelled" if cancel.is_set() else None)
    assert outcome.finish_reason == "cancelled" and outcome.completion_tokens < 20
    for _ in range(engine.capabilities.slots + 1):  # every slot is free again
        assert engine.generate(ids, greedy(4), Recorder()).completion_tokens == 4


def test_a_handed_back_answer_keeps_its_held_back_text_for_the_next_attempt(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    whole = engine.generate(ids, greedy(24), Recorder())
    stop = whole.text.split()[-1] + "~never"  # a stop string whose start may be held back
    chunks = Recorder()
    stopping = threading.Event()

    def on_chunk(text: str, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        chunks(text, token_ids, logprobs)
        stopping.set()

    outcome = engine.generate(ids, greedy(24, stop=(stop,)), on_chunk, interruption=lambda: HANDED_BACK if stopping.is_set() else None)
    assert outcome.finish_reason == HANDED_BACK
    assert whole.text.startswith("".join(chunks.texts))


def test_an_engine_that_dies_hands_its_task_back_and_serves_on(engine: Engine, tokenizer_dir: Path) -> None:
    ids = prompt(engine, STORY, tokenizer_dir)
    if engine.capabilities.engine == "transformers":
        # In this process: nothing of its own can die. The batching engine's decoding thread can,
        # and tests/test_batching_recovery.py kills it.
        assert not hasattr(engine, "server")
        return
    server = engine.server  # type: ignore[attr-defined]
    killed = threading.Event()

    def on_chunk(text: str, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        if not killed.is_set():
            killed.set()
            os.kill(server.pid, signal.SIGKILL)

    with pytest.raises(EngineRestarted):
        engine.generate(ids, greedy(400), on_chunk)
    assert engine.ready and server.restarts == 1
    after = engine.generate(prompt(engine, "What is the capital of France?", tokenizer_dir), greedy(16), Recorder())
    assert "Paris" in after.text

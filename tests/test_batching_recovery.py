"""The batching engine on the real embedded model: a failure in its decoding thread is survived.

Any exception in transformers' batching loop ends its thread and fails every request in flight;
the engine must start afresh, hand those requests back (`EngineRestarted`, which the worker
turns into a requeue) and serve the next ones. The fault injected here is the one a user found:
a top-k beyond the vocabulary ("index 99999 is out of bounds"), added to the manager directly,
since the engine itself now clamps top-k before it gets there.
"""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from model_loader.batching import BatchingEngine
from model_loader.contract import EngineRestarted, FlushPolicy, SamplingParams
from model_loader.loader import LoadedModel, load_model

SAMPLING = SamplingParams(max_new_tokens=200, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[BatchingEngine]:
    settings = Settings(
        _env_file=None, quantization="none", worker_concurrency=2, kv_cache_tokens=512, max_batch_tokens=64,
        model_cache_dir=model_dir.parent,
    )
    loaded = load_model(settings)
    running = BatchingEngine(loaded, FlushPolicy(), settings, context_tokens=512)
    yield running
    running.close()


def prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    """A user turn in the model's chat template, as the worker would send it."""
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_a_dead_decoding_thread_hands_its_requests_back_and_the_engine_serves_on(engine: BatchingEngine) -> None:
    streaming = threading.Event()
    failures: list[BaseException] = []

    def long_generation() -> None:
        try:
            engine.generate(prompt_ids(engine.loaded, "Tell me a long story."), SAMPLING,
                            on_chunk=lambda *_: streaming.set())
        except BaseException as exc:  # noqa: BLE001 (the test inspects it)
            failures.append(exc)

    worker = threading.Thread(target=long_generation)
    worker.start()
    assert streaming.wait(timeout=120), "the generation never streamed"
    fault = {"temperature": 0.7, "top_p": 0.9, "top_k": 100_000}
    engine._manager.add_request(prompt_ids(engine.loaded, "Hi"), max_new_tokens=4, streaming=True, **fault)
    worker.join(timeout=120)

    assert len(failures) == 1 and isinstance(failures[0], EngineRestarted), failures
    assert engine.ready, "the engine did not start again"
    after = engine.generate(prompt_ids(engine.loaded, "What is the capital of France?"),
                            SamplingParams(max_new_tokens=8, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0),
                            on_chunk=lambda *_: None)
    assert "Paris" in after.text

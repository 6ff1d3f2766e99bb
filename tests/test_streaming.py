"""Incremental decoding and stop strings, on the real tokenizer, with no model."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model_loader.streaming import TextStream


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


def stream_all(tokenizer, text: str, stop: tuple[str, ...] = (), flush_every: int = 1) -> tuple[list[str], TextStream]:  # type: ignore[no-untyped-def]
    stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
    chunks = []
    for i, token_id in enumerate(tokenizer.encode(text, add_special_tokens=False), start=1):
        stream.add(token_id)
        if i % flush_every == 0:
            chunks.append(stream.take_publishable())
        if stream.stopped:
            break
    chunks.append(stream.take_rest())
    return [c for c in chunks if c], stream


@pytest.mark.parametrize("flush_every", [1, 3])
@pytest.mark.parametrize(
    "text",
    ["Hello there, general Kenobi.", "  leading spaces and\nnew lines\n", "Crème brûlée, 東京, naïve 🚀🚀 done"],
)
def test_chunks_concatenate_to_the_exact_text(tokenizer, text: str, flush_every: int) -> None:  # type: ignore[no-untyped-def]
    chunks, stream = stream_all(tokenizer, text, flush_every=flush_every)
    assert "".join(chunks) == stream.text == text
    assert all("\ufffd" not in c for c in chunks)


def test_stop_string_ends_the_text_before_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chunks, stream = stream_all(tokenizer, "The answer is 42. END of the story.", stop=("END",))
    assert stream.stopped
    assert stream.text == "The answer is 42. "
    assert "".join(chunks) == stream.text


def test_stop_string_spanning_tokens_is_never_published(tokenizer) -> None:  # type: ignore[no-untyped-def]
    stop = "lighthouse keeper"
    chunks, stream = stream_all(tokenizer, "Once upon a time a lighthouse keeper lived alone.", stop=(stop,))
    assert stream.text == "Once upon a time a "
    assert all("light" not in c for c in chunks)
    assert "".join(chunks) == stream.text


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chunks, stream = stream_all(tokenizer, "a light breeze, then more light", stop=("lighthouse",))
    assert not stream.stopped
    assert "".join(chunks) == "a light breeze, then more light"

"""Incremental decoding and stop strings, on the real tokenizer, with no model."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.protocol import HANDED_BACK
from model_loader.contract import FlushPolicy, Resume, SamplingParams, never
from model_loader.sink import TokenSink
from model_loader.streaming import TextStream

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tokenizer_dir)


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


Published = list[tuple[str, list[int]]]


def sink_for(tokenizer, stop: tuple[str, ...], out: Published) -> TokenSink:  # type: ignore[no-untyped-def]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    flush = FlushPolicy(every_tokens=3, every_s=3600)
    return TokenSink(TextStream(decode, stop), lambda text, ids, logprobs: out.append((text, list(ids))), never, flush)


def feed(sink: TokenSink, token_ids: list[int]) -> None:
    for token_id in token_ids:
        if sink.add(token_id):
            return


LONG = SamplingParams(max_new_tokens=1000, temperature=0, top_p=1, top_k=0, repetition_penalty=1)
STORY = "Once upon a time a lighthouse keeper said: the END is near, then slept."


@pytest.mark.parametrize("stop", [(), ("lighthouse keeper",), ("END",)])
@pytest.mark.parametrize("handed_back", [False, True])
def test_an_answer_taken_up_after_any_token_ends_as_one_attempt_would_have(  # type: ignore[no-untyped-def]
    tokenizer, stop, handed_back
) -> None:
    """The first attempt dies (or hands back) after each token in turn; the next replays the
    published tokens and goes on with the same ones a greedy model would give. The published
    text plus the new chunks is the uninterrupted text, a stop string spanning the takeover point
    included, and the token count is the whole answer's."""
    token_ids = tokenizer.encode(STORY, add_special_tokens=False)
    whole: Published = []
    reference = sink_for(tokenizer, stop, whole)
    feed(reference, token_ids)
    reference.close()
    for cut in range(1, len(token_ids)):
        first: Published = []
        dying = sink_for(tokenizer, stop, first)
        feed(dying, token_ids[:cut])
        if handed_back:
            dying.interrupted = HANDED_BACK
            dying.close()
        ids = [i for _, chunk_ids in first for i in chunk_ids]
        text = "".join(t for t, _ in first)
        assert token_ids[: len(ids)] == ids, "a chunk's tokens are not the ones its text came from"
        rest: Published = []
        going_on = sink_for(tokenizer, stop, rest)
        going_on.resume(Resume(ids, text))
        if going_on.tokens_left(LONG, eos=[]):  # as the engines ask before they generate
            feed(going_on, token_ids[len(ids):])
        going_on.close()
        assert text + "".join(t for t, _ in rest) == going_on.stream.text == reference.stream.text, cut
        assert going_on.tokens == reference.tokens and going_on.stream.stopped_by == reference.stream.stopped_by

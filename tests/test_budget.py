"""Context budgeting does bounded work: the real formatter, counted; no Redis, no model weights."""

import random
from pathlib import Path

import pytest

from core.protocol import ChatMessage, GenerateRequest, Role
from prompts import ChatFormatter, build_prompt, load_formatter

pytestmark = pytest.mark.fast

WORDS = "the quick brown fox jumps over a lazy dog and keeps running far away into the hills".split()


class CountingFormatter:
    """The real formatter, keeping the size of every prompt it was asked to encode."""

    def __init__(self, inner: ChatFormatter) -> None:
        self.inner = inner
        self.reserved_text = inner.reserved_text
        self.sizes: list[int] = []

    def encode(self, system: str | None, messages: list[ChatMessage]) -> list[int]:
        ids = self.inner.encode(system, messages)
        self.sizes.append(len(ids))
        return ids

    def reserved_in(self, text: str) -> str | None:
        return self.inner.reserved_in(text)


@pytest.fixture(scope="module", params=["template", "llama2"])
def formatter(request: pytest.FixtureRequest, tokenizer_dir: Path) -> ChatFormatter:
    return load_formatter(tokenizer_dir, request.param, "test")


def long_conversation(messages: int) -> GenerateRequest:
    rng = random.Random(7)
    roles = (Role.user, Role.assistant)
    turns = [
        ChatMessage(role=roles[i % 2], content=" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 150))))
        for i in range(messages)
    ]
    return GenerateRequest(messages=turns)


def fewest_dropped(formatter: ChatFormatter, request: GenerateRequest, budget: int) -> int:
    """The answer by brute force: drop one more pair at a time until it fits."""
    history, newest = request.conversation()[:-1], request.conversation()[-1]
    return next(
        dropped
        for dropped in range(len(history) // 2 + 1)
        if len(formatter.encode("Be brief.", [*history[2 * dropped :], newest])) <= budget
    )


@pytest.mark.parametrize("budget", [300, 1000, 4000])
def test_trimming_encodes_few_prompts_of_about_the_budgets_size(formatter: ChatFormatter, budget: int) -> None:
    """Bisecting over the whole conversation would encode half of it, then a quarter...: with 255
    messages that is prompts many times the budget. The estimate starts near the answer instead."""
    request = long_conversation(255)
    counting = CountingFormatter(formatter)
    prompt = build_prompt(counting, request, "Be brief.", budget)

    assert prompt.dropped_turns == fewest_dropped(formatter, request, budget)
    assert len(prompt.input_ids) <= budget
    first, *rest = counting.sizes
    assert first > 4 * budget, "the whole conversation is measured once"
    assert len(rest) <= 8, counting.sizes
    assert max(rest) <= 1.5 * budget + 200, counting.sizes

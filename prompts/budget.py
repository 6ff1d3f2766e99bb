"""Fitting a conversation into the context: the oldest turns go first, the system prompt and the question never."""

from collections.abc import Callable
from dataclasses import dataclass

from core.protocol import ChatMessage, GenerateRequest, Role
from prompts.formatter import ChatFormatter


class PromptTooLong(ValueError):
    """Even the system prompt and the newest message alone exceed the budget, so trimming cannot help."""

    def __init__(self, needed: int, limit: int) -> None:
        # The numbers are the args (not the message) so that pickling and Celery can rebuild the exception.
        super().__init__(needed, limit)
        self.needed = needed
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"the prompt needs {self.needed} tokens with the system prompt and newest message alone; "
            f"the limit is {self.limit} (the context window minus max_new_tokens)"
        )


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    dropped_turns: int


def build_prompt(formatter: ChatFormatter, request: GenerateRequest, default_system_prompt: str, budget: int) -> Prompt:
    """The request's prompt ids in at most `budget` tokens, dropping the fewest oldest (user, assistant) pairs.

    Sizes are real token counts of the re-encoded prompt, since turn boundaries add tokens and
    templates may add text of their own.
    """
    system, turns = _split_system(request, default_system_prompt)
    history, newest = turns[:-1], turns[-1]

    def encode(dropped: int) -> list[int]:
        return formatter.encode(system, [*history[2 * dropped :], newest])

    return _fit(encode, len(history) // 2, budget)


def _fit(encode: Callable[[int], list[int]], pairs: int, budget: int) -> Prompt:
    """The prompt with the fewest of `pairs` dropped that fits, found by bisection (a few encodes, not one per pair).

    Bisection assumes that dropping more never lengthens the prompt; every prompt returned
    has been measured all the same.
    """
    ids = encode(0)
    if len(ids) <= budget:
        return Prompt(ids, 0)
    fits, fitting_ids = pairs, encode(pairs) if pairs else ids
    if len(fitting_ids) > budget:
        raise PromptTooLong(len(fitting_ids), budget)
    too_few = 0
    while fits - too_few > 1:
        middle = (too_few + fits) // 2
        candidate = encode(middle)
        if len(candidate) <= budget:
            fits, fitting_ids = middle, candidate
        else:
            too_few = middle
    return Prompt(fitting_ids, fits)


def _split_system(request: GenerateRequest, default_system_prompt: str) -> tuple[str | None, list[ChatMessage]]:
    """The system prompt (request field, else a leading system message, else the default) and the other turns.

    The first source that is given wins, and a blank one means no system prompt: that is how a
    client turns the server's default off.
    """
    turns = request.conversation()
    system = request.system_prompt
    if turns[0].role == Role.system:
        system, turns = turns[0].content, turns[1:]
    if system is None:
        system = default_system_prompt
    return (system if system.strip() else None), turns

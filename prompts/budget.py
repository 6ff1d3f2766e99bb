"""Fitting a conversation into the context: the oldest turns go first, the system prompt and the question
(with the answer begun, if any) never."""

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
    templates may add text of their own; a cheap estimate only picks which counts to take. A raw
    prompt has no turns to drop: it fits or it is refused.
    """
    if request.raw or request.prompt_ids is not None:
        ids = request.prompt_ids if request.prompt_ids is not None else formatter.encode_raw(request.prompt or "")
        if len(ids) > budget:
            raise PromptTooLong(len(ids), budget)
        return Prompt(ids, 0)
    system, turns = _split_system(request, default_system_prompt)
    kept = 2 if request.prefilled else 1  # the question, and the answer begun
    history, newest = turns[:-kept], turns[-kept:]
    pair_chars = [len(history[i].content) + len(history[i + 1].content) for i in range(0, len(history) - 1, 2)]
    fixed_chars = len(system or "") + sum(len(message.content) for message in newest)

    def encode(dropped: int) -> list[int]:
        return formatter.encode(system, [*history[2 * dropped :], *newest])

    return _fit(encode, pair_chars, fixed_chars, budget)


def _fit(encode: Callable[[int], list[int]], pair_chars: list[int], fixed_chars: int, budget: int) -> Prompt:
    """The prompt with the fewest pairs dropped that fits.

    When the whole conversation does not fit, the tokens it took per character tell roughly
    how many pairs must go; the search starts there and widens by doubling, so it encodes a
    few prompts about the budget's size rather than bisecting over the whole conversation.
    It assumes that dropping more never lengthens the prompt; every prompt returned has been
    measured all the same.
    """
    measured: dict[int, list[int]] = {0: encode(0)}

    def fits(dropped: int) -> bool:
        if dropped not in measured:
            measured[dropped] = encode(dropped)
        return len(measured[dropped]) <= budget

    if fits(0):
        return Prompt(measured[0], 0)
    pairs = len(pair_chars)
    if not fits(pairs):
        raise PromptTooLong(len(measured[pairs]), budget)
    too_few, enough = _bracket(fits, _guess(len(measured[0]), pair_chars, fixed_chars, budget), pairs)
    while enough - too_few > 1:
        middle = (too_few + enough) // 2
        too_few, enough = (too_few, middle) if fits(middle) else (middle, enough)
    return Prompt(measured[enough], enough)


def _guess(tokens: int, pair_chars: list[int], fixed_chars: int, budget: int) -> int:
    """How many pairs to drop, if each character costs the conversation's average number of tokens."""
    per_char = tokens / max(1, sum(pair_chars) + fixed_chars)
    excess = tokens - budget
    dropped, freed = 0, 0.0
    while dropped < len(pair_chars) and freed < excess:
        freed += pair_chars[dropped] * per_char
        dropped += 1
    return max(1, dropped)


def _bracket(fits: Callable[[int], bool], guess: int, pairs: int) -> tuple[int, int]:
    """(a count that is too few, a count that fits) around `guess`, found by doubling steps away from it.

    0 is known not to fit and `pairs` to fit.
    """
    step = 1
    if fits(guess):
        enough = guess
        while (too_few := max(0, enough - step)) > 0 and fits(too_few):
            enough, step = too_few, step * 2
        return too_few, enough
    too_few = guess
    while (enough := min(pairs, too_few + step)) < pairs and not fits(enough):
        too_few, step = enough, step * 2
    return too_few, enough


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

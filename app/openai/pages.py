"""OpenAI's cursor pages (files, batches): a page of a list, after the id that ended the page before."""

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Identified(Protocol):
    id: str


T = TypeVar("T", bound=Identified)


def page_after(items: Sequence[T], after: str | None, limit: int) -> tuple[list[T], bool]:
    """The page, and whether more follow it. An `after` that is not in the list is an empty page."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return list(items[:limit]), len(items) > limit

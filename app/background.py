"""Work every API process does in the background, beside the requests: a step repeated on a thread."""

import logging
from collections.abc import Callable

import anyio

log = logging.getLogger(__name__)


async def every(period_s: float, step: Callable[[], None], what: str) -> None:
    """Run `step` (blocking: it gets a thread, so requests never wait on it) every `period_s`, for the
    API's lifetime; a step that fails is logged, and the next one tries again."""
    while True:
        try:
            await anyio.to_thread.run_sync(step)
        except Exception:
            log.exception("%s failed; the next one tries again", what)
        await anyio.sleep(period_s)

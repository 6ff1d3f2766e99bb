"""Work every API process does in the background, beside the requests: a step repeated on a thread, and
a lock in Redis kept while a long step runs."""

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import redis
from redis.lock import Lock

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


@contextmanager
def renewed(lock: Lock) -> Iterator[None]:
    """Keep a held `lock` for as long as the block runs, however long that is (a batch of many lines to
    validate or finalize), renewing it at a third of its timeout; a process that dies stops renewing, and
    the lock lapses for another to take."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lock.timeout / 3):  # type: ignore[operator]
            try:
                lock.reacquire()
            except redis.RedisError:  # lost it (Redis away past its timeout): the step is idempotent
                log.warning("lost %s while working under it", lock.name)
                return

    keeper = threading.Thread(target=renew, name="lock-renewal", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()

"""`make run`: Redis (REDIS_URL if it answers, else a local redis-server), one worker and the API.

Ctrl-C (or SIGTERM, as from `kill` or a process manager) stops them all within seconds, even
mid-answer: the API and the worker first (the worker hands its running tasks back, to go on
where they stopped at the next start or in any other worker), Redis last. The children run in
sessions of their own, so the terminal's Ctrl-C reaches only this supervisor, which stops them
in that order. A worker or an API that exits (an engine that could not recover, a `kill -9`)
is started again, after a pause that grows while it keeps exiting: every task and response
lives on in Redis meanwhile. Redis exiting stops the stack. Logs go to the terminal; Redis data
lives under ./var/redis.
"""

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.settings import get_settings
from devstack.processes import api_command, stop, stop_all, worker_command
from devstack.redis_server import answers, start_redis

log = logging.getLogger("devstack")
VAR = Path("var")
# A worker hands its tasks back at its next token; one that takes longer is killed, and its
# tasks are taken over when their leases lapse.
STOP_S = 5.0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    settings = get_settings()
    redis: subprocess.Popen | None = None  # one this stack started (and so stops)
    worker = Restarting("worker", worker_command())
    api = Restarting("API", api_command(settings.api_host, settings.api_port))
    try:
        if answers(settings.redis_url):
            log.info("using the Redis at REDIS_URL")
        else:
            log.info("starting redis-server (data in %s)", VAR / "redis")
            redis = start_redis(settings.redis_url, VAR / "redis", VAR / "redis.log")
        worker.start()
        api.start()
        log.info("API on %s; Ctrl-C stops everything", settings.base_url)
        return _wait(redis, [api, worker])
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not orphan the children
            signal.signal(signum, signal.SIG_IGN)
        _stop(redis, [api, worker])


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM stops the stack as Ctrl-C does; SIGINT too, even where a shell started us ignoring it."""
    raise KeyboardInterrupt


class Restarting:
    """One of the stack's processes, started again whenever it exits.

    The pause before a restart doubles (up to `MAX_PAUSE_S`) while the process keeps exiting soon
    after starting, so one that cannot start does not spin; one that ran for a while restarts at
    once.
    """

    MAX_PAUSE_S = 30.0
    STEADY_S = 60.0

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.command = command
        self.process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._pause_s = 0.0
        self._restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, start_new_session=True)
        self._started_at = time.monotonic()
        self._restart_at = None

    def watch(self) -> None:
        """Called every tick: notices an exit, and restarts once the pause is over."""
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                log.info("starting the %s again", self.name)
                self.start()
            return
        if self.process is None or self.process.poll() is None:
            return
        ran_s = now - self._started_at
        self._pause_s = 0.0 if ran_s >= self.STEADY_S else min(self.MAX_PAUSE_S, max(1.0, 2 * self._pause_s))
        log.error("the %s exited with code %s after %.0f s; restarting it in %.0f s",
                  self.name, self.process.returncode, ran_s, self._pause_s)
        self._restart_at = now + self._pause_s


def _wait(redis: subprocess.Popen | None, restarting: list[Restarting]) -> int:
    """Until Ctrl-C, or until Redis exits on its own (which stops the rest)."""
    while True:
        if redis is not None and redis.poll() is not None:
            log.error("redis-server exited with code %s; stopping", redis.returncode)
            return 1
        for child in restarting:
            child.watch()
        time.sleep(0.5)


def _stop(redis: subprocess.Popen | None, restarting: list[Restarting]) -> None:
    """The API and the worker together, then Redis, which they need until they have stopped."""
    stop_all([child.process for child in restarting if child.process is not None], timeout_s=STOP_S)
    if redis is not None:
        stop(redis)


if __name__ == "__main__":
    sys.exit(main())

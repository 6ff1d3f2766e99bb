"""`make run`: Redis (REDIS_URL if it answers, else a local redis-server), one worker and the API.

Ctrl-C (or SIGTERM, as from `kill` or a process manager) stops them all. Logs go to the
terminal; Redis data lives under ./var/redis.
"""

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.settings import get_settings
from devstack.processes import api_command, stop, worker_command
from devstack.redis_server import answers, start_redis

log = logging.getLogger("devstack")
VAR = Path("var")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    settings = get_settings()
    processes: list[subprocess.Popen] = []
    try:
        if answers(settings.redis_url):
            log.info("using the Redis at REDIS_URL")
        else:
            log.info("starting redis-server (data in %s)", VAR / "redis")
            processes.append(start_redis(settings.redis_url, VAR / "redis", VAR / "redis.log"))
        processes.append(subprocess.Popen(worker_command()))
        processes.append(subprocess.Popen(api_command(settings.api_host, settings.api_port)))
        log.info("API on %s; Ctrl-C stops everything", settings.base_url)
        return _wait(processes)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM stops the stack as Ctrl-C does; SIGINT too, even where a shell started us ignoring it."""
    raise KeyboardInterrupt


def _wait(processes: list[subprocess.Popen]) -> int:
    """Until Ctrl-C, or until one of the processes exits on its own (which stops the rest)."""
    while True:
        for process in processes:
            if process.poll() is not None:
                log.error("%s exited with code %s; stopping", process.args[:3], process.returncode)
                return 1
        time.sleep(0.5)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        stop(process)


if __name__ == "__main__":
    sys.exit(main())
